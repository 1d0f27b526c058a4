"""What every data-free distillation method is: a typed config, presets, and stages for the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dfkt.config import StrictModel
from dfkt.engine import Engine, Stage
from dfkt.engine.state import TrainState


@dataclass
class DistillSetup:
    """What the API hands a method: prepared models and the shape of the data to invent."""

    teacher: nn.Module  # frozen, eval mode, on the device
    student: nn.Module  # trainable, on the device
    num_classes: int
    channels: int
    image_size: int
    engine: Engine


class DistillMethod(TrainState):
    """Base class. Subclasses set ``Config`` and ``presets`` and implement ``stages`` and ``samples``.

    Everything a resume needs goes in the TrainState dicts (modules, optimizers, rngs, buffers).
    """

    Config: ClassVar[type[StrictModel]]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    summary: ClassVar[str] = ""

    def __init__(self, cfg: StrictModel, setup: DistillSetup):
        super().__init__()
        self.cfg = cfg
        self.setup = setup
        self.engine = setup.engine
        self.teacher = setup.teacher
        self.student = setup.student
        self.modules["student"] = setup.student

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    @torch.no_grad()
    def samples(self, n: int) -> Tensor:
        """``n`` synthetic images in the teacher's input space, for grids and diagnostics."""
        raise NotImplementedError
