"""DeepInversion and Adaptive DeepInversion (Yin et al., CVPR 2020).

Pixels are optimised from noise (with random jitter and flips) to minimise
    L = CE(T(x), y) + w_bn·L_bn + w_tv·TV(x) + w_l2·‖x‖² + w_adi·(1 − JS(S(x)/3, T(x)/3)),
with L_bn matching the teacher's BatchNorm statistics (dfkt.synthesis.bn_prior). w_adi > 0 is
Adaptive DeepInversion: images are pushed to where the current student disagrees with the
teacher. The student learns by KD on the growing pool of inverted images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from dfkt import losses
from dfkt.dfkd.base import BNPriorFields, PixelInversionFields
from dfkt.dfkd.pooled import PooledConfig, PooledMethod
from dfkt.registry import METHODS
from dfkt.synthesis import PixelInversion, bn_prior_or_none, forward_with_prior


class DeepInversionConfig(PooledConfig, BNPriorFields, PixelInversionFields):
    lr: float = Field(0.1, gt=0, description="Adam lr on the pixels")
    betas: tuple[float, float] = (0.5, 0.99)
    w_bn: float = Field(10.0, ge=0)
    first_bn_multiplier: float = Field(1.0, ge=0, description="extra weight of the first BatchNorm layer")
    w_tv: float = Field(2.5e-5, ge=0)
    w_l2: float = Field(0.0, ge=0)
    w_adi: float = Field(0.0, ge=0, description="competition weight; > 0 is Adaptive DeepInversion")
    target_mix: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of each inverted batch aimed at two classes at once, λ·a + (1 − λ)·b with λ ~ U(0.5, 1) "
        "(images between classes, which one template per class lacks); 0: one class each, as the authors",
    )
    max_shift: int = Field(2, ge=0, description="random jitter in pixels")
    flip: bool = Field(
        True, description="random horizontal flips while inverting (only on mirror-safe data: never digits)"
    )


# 2 CPU cores, measured on the WRN-16-2 -> WRN-16-1 Fashion-MNIST pair at 10 minutes, 3 seeds
# (benchmarks/analysis/batchnorm_pairs.md): short inversions (50 steps on batches of 64) of smooth half-side
# images from black, every BatchNorm layer weighed alike, each finished batch rescaled to the contrast of
# real inputs, and most of the budget left to the student (120 steps per batch; shift + flip relabelled
# by the teacher, T 4). 74.2 ± 2.5 there, where the earlier preset (200 iterations on batches of 128 from
# N(0, 1)) gave 16-27. The steps per batch were within the seed spread from 30 to 120 (72.3, 72.5, 74.2).
# 40,000 student steps: on B2's LeNet-5 pair 10,000 ended after 140 s (73.8 ± 4.8) and 40,000 filled the
# 10 minutes (79.2 ± 1.2, every seed higher); with --max-seconds a larger network stops at the budget.
# Cutmix on the student's batches (relabelled by the teacher): 81.7 ± 1.7 against 78.9 ± 1.2 on B2 at 10 minutes,
# every seed higher, and 81.6 against 76.4 at 5 (benchmarks/results/ablation_b2_deepinversion_adi_cutmix.md);
# the ADI competition term in the same run: 79.5 ± 0.4, within the spread, so it stays in `cpu-adi` only.
# A batch every 60 student steps (pool 40,000) with the student's weight average (decay 0.999): 83.3 ± 1.0 on B2
# at 10 minutes (83.1 / 84.5 / 82.4) against 82.0 ± 1.7; each alone 83.0 ± 0.4 and 82.7 ± 0.8, the weakest seed
# raised by 2-3 points (benchmarks/analysis/ablation_b2_deepinversion.md). On the WRN pair: 79.6 ± 0.6 against
# 80.6 ± 2.0 (benchmarks/results/ablation_wrn_deepinversion_round10.md), synthesis there taking 331 of 600 s.
# Left out, each within the seed spread on B2 (fp32 on AVX2, 3 seeds, ablation_b2_deepinversion.md): half of each
# batch aimed between two classes (target_mix=0.5) 82.3 ± 1.6, rotate + scale 81.9 ± 1.7, mixup 81.7 ± 1.2, against
# the preset's 82.2 ± 1.8 in the same run.
# The student started from the teacher's weights where it is the teacher with fewer channels (student_init=auto):
# 83.4 ± 0.3 on B2 at 10 minutes against 82.2 ± 1.8, and 83.2 ± 0.4 against 81.1 ± 2.2 at 5 (fp32 on AVX2, 3 seeds,
# benchmarks/analysis/student_init.md).
# With it, the student's layers held at the teacher's leading channels by a hint loss (feature_weight, on where the
# student started from the teacher): 84.9 ± 0.1 on B2 at 10 minutes against 83.4 ± 0.3, pullovers 70-73% against
# 37-47%; weights 1 and 10 gave 84.3 ± 0.2 and 84.6 ± 0.1 (fp32 on AVX2, 3 seeds, benchmarks/analysis/feature_hints.md).
# Synthesis capped at 40% of the student stage's time (synthesis_share): on the WRN pair on an EPYC without AMX,
# where inversions took 290 of the 600 s, 75.8 ± 3.3 against 73.3 ± 3.3 at 10 minutes, every seed higher (+0.9, +1.9,
# +4.7; benchmarks/results/ablation_wrn_deepinversion_synthesis_share.md); on B2, where synthesis takes ~30%, the cap
# never binds (a batch every 60 steps throughout, the curves identical at every common step; 84.3 ± 0.2 against
# 84.1 ± 0.2 from more steps on a less loaded machine; ablation_b2_deepinversion_share.md).
# The student sliced from the teacher's channels the next layer reads most (student_channels=outgoing_norm) and held
# near that start by L2-SP (student_anchor 0.01), as RDSKD's cpu preset: 85.0 ± 0.1 on B2 at 10 minutes against
# 84.3 ± 0.2, every seed higher, and 84.9 ± 0.1 against 81.7 ± 0.2 at 2 minutes (bf16 on AVX512-BF16, 3 seeds,
# benchmarks/results/ablation_b2_deepinversion_ranked_anchor.md). The WRN pair's student starts at random, where
# neither applies.
CPU = {
    "synthesis_batch": 64,
    "synthesis_iterations": 50,
    "start": "dark",
    "downscale": 2,
    "standardise": True,
    "bn_distance": "standardised",
    "w_bn": 1.0,
    "student_batch": 128,
    "student_steps_per_synthesis": 60,
    "student_epochs": 400,
    "student_steps_per_epoch": 100,
    "temperature": 4.0,
    "augment": ["shift", "flip", "cutmix"],
    "pool_size": 40000,
    "average_decay": 0.999,
    "student_init": "auto",
    "student_channels": "outgoing_norm",
    "student_anchor": 0.01,
    "feature_weight": 3.0,
    "synthesis_share": 0.4,
}


@METHODS.register("deepinversion")
class DeepInversion(PooledMethod):
    Config = DeepInversionConfig
    summary = "pixels inverted with BatchNorm-statistics prior (+ ADI competition), KD on the pool"
    presets = {
        # CIFAR-10 in the authors' code: batch 256, 2,000 iterations, BN weight 10.
        "paper": {},
        "paper-adi": {"w_adi": 1.0},
        "cpu": CPU,
        "cpu-adi": {**CPU, "w_adi": 1.0},
    }

    def make_source(self, cfg: DeepInversionConfig, setup) -> PixelInversion:
        self.prior = bn_prior_or_none(
            self.teacher, "deepinversion", cfg.w_bn, cfg.first_bn_multiplier, distance=cfg.bn_distance
        )
        return PixelInversion(
            self,
            self.engine,
            self.teacher,
            self.pool,
            self.objective,
            self.random_labels,
            (setup.channels, setup.image_size, setup.image_size),
            cfg.synthesis_batch,
            cfg.synthesis_iterations,
            cfg.lr,
            cfg.betas,
            cfg.max_shift,
            cfg.flip and setup.mirror_safe,
            setup.pixel_range() if cfg.clamp else None,
            cfg.start,
            cfg.inverted_side(setup.image_size),
            cfg.standardise,
            cfg.start_noise,
        )

    def random_labels(self, n: int, rng: torch.Generator) -> Tensor:
        """n uniform class labels; with ``target_mix``, probability targets whose first ``target_mix`` share
        mixes each label with a second, different class."""
        k = self.setup.num_classes
        labels = torch.randint(0, k, (n,), generator=rng, device=rng.device)
        mixed = round(self.cfg.target_mix * n)
        if not mixed:
            return labels
        targets = F.one_hot(labels, k).float()
        other = (labels[:mixed] + torch.randint(1, k, (mixed,), generator=rng, device=rng.device)) % k
        weight = 0.5 + 0.5 * torch.rand(mixed, 1, generator=rng, device=rng.device)
        targets[:mixed] = weight * targets[:mixed] + (1 - weight) * F.one_hot(other, k).float()
        return targets

    def objective(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        logits, l_bn = forward_with_prior(self.prior, self.teacher, images)
        ce = F.cross_entropy(logits.float(), targets)
        tv = losses.total_variation(images)
        l2 = images.float().pow(2).sum(dim=(1, 2, 3)).mean()
        loss = ce + cfg.w_bn * l_bn + cfg.w_tv * tv + cfg.w_l2 * l2
        terms = {"ce": ce, "bn": l_bn, "tv": tv}
        if cfg.w_adi > 0:
            with self.student_as_judge():
                competition = losses.competition_loss(self.student(images), logits)
            loss = loss + cfg.w_adi * competition
            terms["adi"] = competition
        return {"loss": loss, **terms}
