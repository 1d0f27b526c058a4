"""Methods that synthesize batches into a pool and train the student on the pool (DeepInversion/ADI,
ZSKD, CMI, Fast).

Every ``student_steps_per_synthesis`` student steps one new batch is synthesized into the pool (the
first before the first student step), so the student learns while the pool grows, in one stage;
with ``synthesis_rounds`` the pool stops growing after that many batches.
The pool is part of the checkpoint: a resumed run continues with the very images it had.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from dfkt.dfkd.base import DistillMethod, DistillSetup
from dfkt.dfkd.student import StudentTrainer, StudentTrainingConfig
from dfkt.engine import Stage
from dfkt.synthesis import ImagePool, Synthesizer


class PooledConfig(StudentTrainingConfig):
    temperature: float = Field(20.0, gt=0)
    pool_size: int = Field(50000, ge=1, description="images kept; the oldest are overwritten")
    synthesis_batch: int = Field(256, ge=1)
    synthesis_iterations: int = Field(2000, ge=1, description="optimisation steps per synthesized batch")
    student_steps_per_synthesis: int = Field(2000, ge=1)
    synthesis_rounds: int | None = Field(
        None,
        ge=1,
        description="synthesize this many batches, then train on the "
        "fixed pool (ZSKD's authors make a fixed set of "
        "impressions); none: to the end of the run",
    )
    selection_holdout: int = Field(
        256,
        ge=0,
        description="synthetic images kept out of training (a tenth of each "
        "batch until there are this many) for label-free selection",
    )


class PooledMethod(DistillMethod):
    def __init__(self, cfg: PooledConfig, setup: DistillSetup):
        super().__init__(cfg, setup)
        self.pool = ImagePool(self, cfg.pool_size, holdout=cfg.selection_holdout)
        self.source = self.make_source(cfg, setup)
        self.student_trainer = StudentTrainer(
            self, cfg, self.source, cfg.student_steps_per_synthesis, max_syntheses=cfg.synthesis_rounds
        )

    def make_source(self, cfg: PooledConfig, setup: DistillSetup) -> Synthesizer:
        raise NotImplementedError

    def validation_samples(self, n: int) -> Tensor | None:
        return self.pool.held_out()

    def stages(self) -> list[Stage]:
        return [self.student_trainer.stage(train=[], frozen=[self.teacher])]
