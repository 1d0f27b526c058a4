"""Student training by KD on synthetic images: the shared last stage of generator-based methods.

Images come either fresh from the synthesizer every step ("fresh", the papers' protocol), or
from a fixed pool drawn once with the teacher's logits cached ("pool"), which trades
diversity for many more student steps per second on a CPU. With ``augment`` the pool images
are shifted and flipped per step and the teacher is asked again on what the student sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

import torch
from pydantic import Field
from torch import Tensor

from dfkt import losses
from dfkt.config import StrictModel
from dfkt.data.augment import shift_and_flip
from dfkt.engine import Stage

if TYPE_CHECKING:
    from dfkt.dfkd.base import DistillMethod

POOL_CHUNK = 1024


class StudentTrainingConfig(StrictModel):
    student_lr: float = Field(2e-3, gt=0)
    student_batch: int = Field(512, ge=1)
    student_epochs: int = Field(1000, ge=1)
    student_steps_per_epoch: int = Field(120, ge=1)
    lr_milestones: list[int] = Field([], description="epochs at which the student lr is multiplied by lr_gamma")
    lr_gamma: float = Field(0.1, gt=0)
    temperature: float = Field(10.0, gt=0)
    student_data: Literal["fresh", "pool"] = "fresh"
    pool_size: int = Field(50000, ge=1)
    augment: bool = False


class StudentTrainer:
    """Builds the KD stage for a method; ``synthesize(n, rng)`` returns images without grad."""

    def __init__(self, method: "DistillMethod", cfg: StudentTrainingConfig,
                 synthesize: Callable[[int, torch.Generator], Tensor]):
        self.method = method
        self.cfg = cfg
        self.synthesize = synthesize
        engine = method.engine
        self.optimizer = engine.prepare_optimizer(torch.optim.Adam(method.student.parameters(), lr=cfg.student_lr))
        milestones = [m * cfg.student_steps_per_epoch for m in cfg.lr_milestones]
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, cfg.lr_gamma)
        method.optimizers["student"] = self.optimizer
        method.schedulers["student"] = self.scheduler
        method.rngs["student"] = engine.noise_generator(offset=2)
        self.pool_images: Tensor | None = None
        self.pool_logits: Tensor | None = None

    @property
    def steps(self) -> int:
        return self.cfg.student_epochs * self.cfg.student_steps_per_epoch

    def stage(self, frozen: list) -> Stage:
        begin = self.fill_pool if self.cfg.student_data == "pool" else None
        return Stage("student", self.steps, self.step, train=[self.method.student], frozen=frozen,
                     begin=begin, evaluate=True)

    @torch.no_grad()
    def fill_pool(self) -> None:
        """Draw the pool from a generator seeded afresh, so a resumed run rebuilds the same pool."""
        engine = self.method.engine
        rng = engine.noise_generator(offset=3)
        images, logits = [], []
        with engine.autocast():
            for start in range(0, self.cfg.pool_size, POOL_CHUNK):
                n = min(POOL_CHUNK, self.cfg.pool_size - start)
                x = self.synthesize(n, rng).float()
                images.append(x)
                logits.append(self.method.teacher(x).float())
        self.pool_images = torch.cat(images)
        self.pool_logits = torch.cat(logits)

    def batch(self) -> tuple[Tensor, Tensor]:
        """A training batch and the teacher's logits on it."""
        cfg, rng = self.cfg, self.method.rngs["student"]
        teacher = self.method.teacher
        if cfg.student_data == "fresh":
            with torch.no_grad():
                images = self.synthesize(cfg.student_batch, rng)
                return images, teacher(images)
        assert self.pool_images is not None, "fill_pool() runs when the stage begins"
        index = torch.randint(0, self.pool_images.shape[0], (cfg.student_batch,),
                              device=self.pool_images.device, generator=rng)
        images = self.pool_images[index]
        if not cfg.augment:
            return images, self.pool_logits[index]
        images = shift_and_flip(images, rng)
        with torch.no_grad():
            return images, teacher(images)

    def step(self, i: int) -> dict[str, Tensor | float]:
        images, teacher_logits = self.batch()
        loss = losses.kd_loss(self.method.student(images), teacher_logits, self.cfg.temperature)
        self.method.engine.optimize(loss, self.optimizer, "student KD loss")
        self.scheduler.step()
        return {"kd": loss}
