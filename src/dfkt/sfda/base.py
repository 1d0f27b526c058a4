"""What every source-free adaptation method is: a typed config, presets, and stages for the engine.

A method receives the source model (a trainable copy) and the unlabelled target images it adapts
on. Online methods (BN-adapt, Tent) see each target batch once, in a fixed seeded order, and are
scored on the predictions they made as the stream went by; offline methods (SHOT, NRC, AaD) run
several epochs and are scored after adapting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dfkt.config import StrictModel
from dfkt.engine import Engine, Stage
from dfkt.engine.state import TrainState
from dfkt.errors import ConfigError
from dfkt.training import EpochBatches, make_optimizer


@dataclass
class AdaptSetup:
    model: nn.Module  # the source model to adapt, trainable, on the device
    images: Tensor  # normalised target images to adapt on, on the device
    engine: Engine


class OnlineConfig(StrictModel):
    batch_size: int = Field(200, ge=2)


class OfflineConfig(StrictModel):
    batch_size: int = Field(64, ge=2)
    epochs: int = Field(30, ge=1)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-3, ge=0)


class AdaptMethod(TrainState):
    """Base class: ``Config``, ``name``, ``presets`` (``paper``, ``cpu``), ``online``, ``stages()``."""

    Config: ClassVar[type[StrictModel]]
    name: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    summary: ClassVar[str] = ""
    online: ClassVar[bool] = False

    def __init__(self, cfg: Any, setup: AdaptSetup):
        super().__init__(setup.engine.device)
        self.cfg, self.setup, self.engine = cfg, setup, setup.engine
        self.model = setup.model
        self.images = setup.images
        self.modules["model"] = self.model
        self.batches = EpochBatches(self, self.engine, len(self.images), getattr(cfg, "batch_size", 1), 20)
        # Online methods' predictions as the stream went by (-1: not seen yet).
        self.buffers["online_predictions"] = torch.full((len(self.images),), -1, dtype=torch.long,
                                                        device=self.engine.device)

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.cfg
        return self.engine.prepare_optimizer(
            make_optimizer(params, cfg.optimizer, cfg.lr, getattr(cfg, "momentum", 0.9), cfg.weight_decay,
                           nesterov=True))

    def stages(self) -> list[Stage]:
        raise NotImplementedError


def batchnorm_layers(model: nn.Module, method: str) -> list[nn.modules.batchnorm._BatchNorm]:
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ConfigError(f"{method} adapts BatchNorm layers and this source model has none; use shot, nrc or "
                          "aad, or a source model with BatchNorm (e.g. 'dfkt train-source --model shot_lenet')")
    return layers
