"""The objective CMI and Fast share, and their common config.

A generator (trained afresh per batch, dfkt.synthesis.generator_inversion) minimises
    w_bn·L_bn + w_oh·CE(T(x), y) + w_adv·L_adv,  L_adv = −mean 1[argmax S = argmax T]·KL(T ‖ S)
so images match the teacher's BatchNorm statistics, are classified as their target class, and
sit where the student still disagrees with the teacher.

The authors' generators end in a sigmoid in pixel space, normalised after: the ``paper`` presets set
``gen_output: pixels``. The ``cpu`` presets keep tanh + BatchNorm: with their few generator steps
per batch the sigmoid output starts flat grey and Fast collapsed on B2 (90% of samples in two
classes, 31.7% student against 72.9% for RDSKD in the same run, 2026-12-02).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from dfkt import losses
from dfkt.dfkd.base import GeneratorFields
from dfkt.dfkd.pooled import PooledConfig, PooledMethod
from dfkt.synthesis import BNStatsPrior, forward_with_prior


class GeneratorPoolConfig(PooledConfig, GeneratorFields):
    nz: int = Field(256, ge=1)
    gen_lr: float = Field(1e-3, gt=0)
    z_lr: float = Field(1e-3, gt=0, description="lr of the input noise, optimised with the generator")
    w_bn: float = Field(1.0, ge=0)
    w_oh: float = Field(0.5, ge=0)
    w_adv: float = Field(0.5, ge=0)
    student_optimizer: Literal["adam", "sgd"] = "sgd"
    student_lr: float = Field(0.1, gt=0)
    student_batch: int = Field(128, ge=1)


class GeneratorPoolMethod(PooledMethod):
    prior: BNStatsPrior | None
    needs_teacher_features = True

    def shared_objective(self, images: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The shared terms, and the teacher's penultimate features (CMI's contrastive term uses them)."""
        cfg = self.cfg
        features, l_bn = forward_with_prior(self.prior, self.teacher.forward_features, images)
        logits = self.teacher.classify(features)
        ce = F.cross_entropy(logits.float(), targets)
        with self.student_as_judge():
            adv = losses.adversarial_kl_loss(self.student(images), logits)
        loss = cfg.w_bn * l_bn + cfg.w_oh * ce + cfg.w_adv * adv
        return {"loss": loss, "bn": l_bn, "ce": ce, "adv": adv}, features
