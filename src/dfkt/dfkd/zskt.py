"""ZSKT: zero-shot knowledge transfer via adversarial belief matching (Micaelli & Storkey, NeurIPS 2019).

The generator maximises KL(T ‖ S); the student minimises KL(T ‖ S) + β·AT, where AT matches the
spatial attention maps of teacher and student blocks (β = 250), taking 10 steps per generator step.
Blocks are the direct children of each model's backbone (stem, block groups, layers), matched by
spatial size: the output of the last child at each resolution above 1×1, so any pair of
convolutional networks with common resolutions works (for WRN and ResNet: the group outputs).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from pydantic import Field
from torch import Tensor, nn

from dfkt import losses
from dfkt.dfkd.joint import JointConfig, JointMethod
from dfkt.dfkd.student import StudentLoss
from dfkt.engine import Stage
from dfkt.errors import ConfigError
from dfkt.registry import METHODS


class ZSKTConfig(JointConfig):
    gen_batch: int = Field(128, ge=2)
    student_batch: int = Field(128, ge=1)
    student_steps_per_generator_step: int = Field(10, ge=1)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(250.0, ge=0, description="attention-transfer weight")
    student_epochs: int = Field(800, ge=1)
    student_steps_per_epoch: int = Field(1000, ge=1)


class BlockActivations:
    """Inside ``recording()``, keeps the output of the last backbone child at each spatial size (> 1)."""

    def __init__(self, model: nn.Module):
        self.by_size: dict[int, Tensor] = {}
        self.active = False
        backbone = getattr(model, "backbone", model)
        for child in backbone.children():
            child.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self.active and isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] > 1:
            self.by_size[output.shape[-1]] = output

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.by_size, self.active = {}, True
        try:
            yield
        finally:
            self.active = False


@METHODS.register("zskt")
class ZSKT(JointMethod):
    Config = ZSKTConfig
    summary = "adversarial: generator maximises KL(T||S); student KL + attention transfer"
    presets = {
        "paper": {},
        # 2 cores: 2,000 student steps (200 generator steps).
        "cpu": {"student_epochs": 20, "student_steps_per_epoch": 100},
    }

    def __init__(self, cfg: ZSKTConfig, setup):
        super().__init__(cfg, setup)
        self.teacher_blocks = BlockActivations(self.teacher)
        self.student_blocks = BlockActivations(self.student)

    def objective(self, images: Tensor, z: Tensor) -> dict[str, Tensor]:
        with self.student_as_judge(eval_mode=False):
            divergence = losses.kd_loss(self.student(images), self.teacher(images), 1.0)
        return {"loss": -divergence, "discrepancy": divergence}

    def matched_blocks(self) -> tuple[list[Tensor], list[Tensor]]:
        sizes = sorted(set(self.teacher_blocks.by_size) & set(self.student_blocks.by_size))
        if not sizes:
            raise ConfigError("zskt's attention transfer found no activation size shared by teacher and student; "
                              "pick a student of the teacher's family or --set params.beta=0")
        return ([self.student_blocks.by_size[s] for s in sizes], [self.teacher_blocks.by_size[s] for s in sizes])

    def stages(self) -> list[Stage]:
        stage = super().stages()[0]
        student_step = stage.step

        def step(i: int) -> dict[str, Tensor | float]:
            with self.teacher_blocks.recording(), self.student_blocks.recording():
                return student_step(i)
        stage.step = step
        return [stage]

    def student_loss(self) -> StudentLoss:
        def loss(student_logits: Tensor, teacher_logits: Tensor, images: Tensor) -> dict[str, Tensor]:
            # The trainer has just run the teacher, then the student, on ``images``: the hooks hold both.
            kl = losses.kd_loss(student_logits, teacher_logits, self.cfg.temperature)
            if self.cfg.beta == 0:
                return {"loss": kl, "kl": kl}
            at = losses.attention_transfer_loss(*self.matched_blocks())
            return {"loss": kl + self.cfg.beta * at, "kl": kl, "at": at}
        return loss
