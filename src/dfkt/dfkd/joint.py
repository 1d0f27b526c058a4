"""Methods that train a generator and the student together, in one stage (DAFL, MSKD, DFAD, ZSKT).

Every ``student_steps_per_generator_step`` student steps the generator takes one step on the
method's objective; the student learns from the generator's samples in between.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from dfkt.dfkd.base import DistillMethod, DistillSetup, GeneratorFields, build_method_generator
from dfkt.dfkd.student import StudentLoss, StudentTrainer, StudentTrainingConfig
from dfkt.engine import Stage
from dfkt.synthesis import GeneratorSynthesizer


class JointConfig(StudentTrainingConfig, GeneratorFields):
    nz: int = Field(100, ge=1, description="latent size")
    gen_lr: float = Field(1e-3, gt=0)
    gen_batch: int = Field(512, ge=2)
    student_steps_per_generator_step: int = Field(1, ge=1)
    gen_clip_norm: float | None = Field(
        None,
        gt=0,
        description="rescale the generator's gradients to at most this "
        "total L2 norm before each step (ZSKT's authors: 5)",
    )
    gen_lr_follows_student: bool = Field(
        False,
        description="the generator's lr is multiplied by whatever the student's schedule (lr_schedule, "
        "lr_milestones) has multiplied the student's by, as ZSKT's and DFAD's authors schedule both",
    )


class JointMethod(DistillMethod):
    samples_in_train_mode = True
    reuse_latest = False  # True (DAFL): the student trains on the generator step's own images

    def __init__(self, cfg: JointConfig, setup: DistillSetup):
        super().__init__(cfg, setup)
        reuse, redraw = self.batch_reuse()
        self.source = GeneratorSynthesizer(
            self,
            self.engine,
            build_method_generator(cfg, cfg.nz, setup),
            cfg.nz,
            cfg.gen_lr,
            cfg.gen_batch,
            self.objective,
            reuse_latest=reuse,
            redraw_after_update=redraw,
            clip_norm=cfg.gen_clip_norm,
            lr_factor=(lambda: self.student_trainer.lr_factor()) if cfg.gen_lr_follows_student else None,
        )
        self.generator = self.source.generator
        self.student_trainer = StudentTrainer(
            self, cfg, self.source, cfg.student_steps_per_generator_step, self.student_loss()
        )

    def batch_reuse(self) -> tuple[bool, bool]:
        """Whether the student trains on the batch of the last generator step rather than fresh samples, and
        whether that batch is drawn again (same z) after the generator's update."""
        return self.reuse_latest, False

    def objective(self, images: Tensor, z: Tensor) -> dict[str, Tensor]:
        """The generator's loss terms on one batch (``loss`` is minimised)."""
        raise NotImplementedError

    def student_loss(self) -> StudentLoss | None:
        """The student's loss; None is τ²-scaled KD at the config's temperature."""
        return None

    def stages(self) -> list[Stage]:
        return [self.student_trainer.stage(train=[self.generator], frozen=[self.teacher])]
