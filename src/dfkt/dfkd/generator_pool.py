"""The objective CMI and Fast share, and their common config.

A generator (trained afresh per batch, dfkt.synthesis.generator_inversion) minimises
    w_bn·L_bn + w_oh·CE(T(x), y) + w_adv·L_adv,  L_adv = −mean 1[argmax S = argmax T]·KL(T ‖ S)
so images match the teacher's BatchNorm statistics, are classified as their target class, and
sit where the student still disagrees with the teacher.

As in both authors' codes, the teacher (and the student, for the adversarial term) judge a random
crop (padded by 1/8 of the width, 4 pixels at 32×32) and horizontal flip of the generator's output
(``synthesis_augment``; the flip only on mirror-safe data, never digits); the pool keeps the images
themselves. Their students learn by SGD (momentum 0.9, weight decay 1e-4) with a cosine lr.

The authors' generators end in a sigmoid in pixel space, normalised after: the ``paper`` presets set
``gen_output: pixels``. The ``cpu`` presets keep tanh + BatchNorm: with 5 (Fast) or 30 (CMI) generator steps per
batch from a flat grey start, the sigmoid collapsed both on B2 (Fast 31.7% against 72.9% for RDSKD in the same
run, 2026-12-02; CMI 12.9 and 14.0%, every sample in two classes, 2026-12-06); tanh + BatchNorm clamped into the
input range lowered their means (CMI 43.0 ± 7.0 against 45.9 ± 1.3, Fast 50.3 ± 10.0 against 58.4 ± 7.3, 3 seeds,
2026-12-06).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from dfkt import losses
from dfkt.data.augment import crop_and_flip
from dfkt.dfkd.base import BNPriorFields, DistillSetup, GeneratorFields
from dfkt.dfkd.pooled import PooledConfig, PooledMethod
from dfkt.synthesis import BNStatsPrior, forward_with_prior


class GeneratorPoolConfig(PooledConfig, GeneratorFields, BNPriorFields):
    nz: int = Field(256, ge=1)
    gen_lr: float = Field(1e-3, gt=0)
    z_lr: float = Field(1e-3, gt=0, description="lr of the input noise, optimised with the generator")
    w_bn: float = Field(1.0, ge=0)
    w_oh: float = Field(0.5, ge=0)
    w_adv: float = Field(0.5, ge=0)
    student_optimizer: Literal["adam", "sgd"] = "sgd"
    student_lr: float = Field(0.1, gt=0)
    student_batch: int = Field(128, ge=1)
    student_weight_decay: float = Field(1e-4, ge=0, description="the authors': 1e-4 (with SGD)")
    lr_schedule: Literal["step", "cosine"] = Field(
        "cosine",
        description="step: multiply by lr_gamma at "
        "lr_milestones; cosine: anneal to lr_min over the student stage "
        "(the authors')",
    )
    synthesis_augment: bool = Field(
        True,
        description="the teacher and the student judge a random crop (padded by 1/8 of the width) and flip "
        "(mirror-safe data only) of each generated image, as the authors' codes do; the pool keeps "
        "the images themselves",
    )


class GeneratorPoolMethod(PooledMethod):
    prior: BNStatsPrior | None
    needs_teacher_features = True

    def __init__(self, cfg: GeneratorPoolConfig, setup: DistillSetup):
        super().__init__(cfg, setup)
        self.augment_rng = self.engine.rng("synthesis_augment")
        self.keep("synthesis_augment", self.augment_rng)

    def judged_view(self, images: Tensor) -> Tensor:
        """What the teacher and the student see of generated images: with ``synthesis_augment`` a random crop
        (padding 1/8 of the width, black fill) and, on mirror-safe data, a random flip."""
        if not self.cfg.synthesis_augment:
            return images
        pixel_range = self.setup.pixel_range()
        return crop_and_flip(
            images,
            self.augment_rng,
            max(1, images.shape[-1] // 8),
            self.setup.mirror_safe,
            None if pixel_range is None else pixel_range[0],
        )

    def shared_objective(self, images: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The shared terms on the judged view of ``images``, and the teacher's penultimate features of that view
        (CMI's contrastive term uses them as the global view)."""
        cfg = self.cfg
        images = self.judged_view(images)
        features, l_bn = forward_with_prior(self.prior, self.teacher.forward_features, images)
        logits = self.teacher.classify(features)
        ce = F.cross_entropy(logits.float(), targets)
        with self.student_as_judge():
            adv = losses.adversarial_kl_loss(self.student(images), logits)
        loss = cfg.w_bn * l_bn + cfg.w_oh * ce + cfg.w_adv * adv
        return {"loss": loss, "bn": l_bn, "ce": ce, "adv": adv}, features
