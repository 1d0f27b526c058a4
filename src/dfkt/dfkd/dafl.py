"""DAFL: data-free learning of student networks (Chen et al., ICCV 2019).

Generator and student are updated in turn every iteration. The generator minimises
    L_G = w_oh·L_oh + w_a·L_a + w_ie·L_ie
(one-hot, activation on the teacher's penultimate features, and class balance with log₁₀);
the student learns by KD (τ = 1 in the authors' code) on the very batch the generator made.
Known failure: the generator can collapse to one image at lr_G 0.2 (see dfkt.diagnostics).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import Tensor, nn

from dfkt import losses
from dfkt.dfkd.joint import JointConfig, JointMethod
from dfkt.registry import METHODS


class DAFLConfig(JointConfig):
    gen_lr: float = Field(0.2, gt=0)
    w_oh: float = Field(1.0, ge=0)
    w_a: float = Field(0.1, ge=0)
    w_ie: float = Field(5.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    student_epochs: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _student_uses_generator_batch(self) -> DAFLConfig:
        if self.student_batch > self.gen_batch:
            raise ValueError("student_batch cannot exceed gen_batch: the student trains on the generator's batch")
        if self.student_steps_per_generator_step != 1:
            raise ValueError(
                "student_steps_per_generator_step must be 1: each student step uses the batch of "
                "the generator step just before it"
            )
        return self


# CIFAR-10 in the authors' README: their loss weights there are 0.05 (one-hot), 0.01 (activation) and 5 (class
# balance); the student is SGD 0.1 (momentum 0.9, weight decay 5e-4) x0.1 at epochs 800 and 1600.
PAPER_CIFAR10 = {
    "nz": 1000,
    "gen_lr": 0.02,
    "gen_batch": 1024,
    "student_batch": 1024,
    "student_optimizer": "sgd",
    "student_lr": 0.1,
    "student_momentum": 0.9,
    "student_weight_decay": 5e-4,
    "student_epochs": 2000,
    "lr_milestones": [800, 1600],
    "w_oh": 0.05,
    "w_a": 0.01,
    "w_ie": 5.0,
}


@METHODS.register("dafl")
class DAFL(JointMethod):
    Config = DAFLConfig
    needs_teacher_features = True
    summary = "generator (one-hot + activation + class balance) and student trained jointly"
    reuse_latest = True
    presets = {
        # MNIST in the authors' code: lr_G 0.2 belongs with batch 512 (at batch 128 it collapses, see "cpu").
        "paper": {
            "nz": 100,
            "gen_lr": 0.2,
            "gen_batch": 512,
            "student_batch": 512,
            "student_optimizer": "adam",
            "student_lr": 2e-3,
            "student_epochs": 200,
            "student_steps_per_epoch": 120,
            "w_oh": 1.0,
            "w_a": 0.1,
            "w_ie": 5.0,
        },
        "paper-cifar10": PAPER_CIFAR10,
        # 224x224 ImageNet-style teachers (not a published setting): CIFAR-10's with the deep generator.
        "paper-imagenet": {**PAPER_CIFAR10, "gen_batch": 256, "student_batch": 256, "generator": "deep"},
        # 2 cores: batch 128 and 600 iterations (0.5-1 s each for a 32x32 generator here); lr_G scaled down with
        # the batch to 0.05, and samples clamped into the range of real inputs. On B2 (3 seeds, runs end at ~340 s):
        # the authors' 0.2 35.0 ± 22.7 (seed 2 collapsed to 10%), 0.05 47.6 ± 5.4, 0.05 clamped 62.9 ± 3.4; for MSKD,
        # which shares these presets, 57.3 ± 6.0, 57.6 ± 7.1 and 60.3 ± 1.8
        # (benchmarks/results/ablation_b2_dafl_clamped.md, ablation_b2_mskd_lrG_clamped.md).
        "cpu": {"gen_batch": 128, "student_batch": 128, "student_epochs": 5, "gen_lr": 0.05, "gen_output": "clamped"},
    }

    def objective(self, images: Tensor, z: Tensor) -> dict[str, Tensor]:
        return generator_objective(self.teacher, images, self.cfg.w_oh, self.cfg.w_a, self.cfg.w_ie)


def generator_objective(teacher: nn.Module, images: Tensor, w_oh: float, w_a: float, w_ie: float) -> dict[str, Tensor]:
    """DAFL's generator loss on one batch; ``teacher`` has ``forward_features`` and ``classify``. Also used
    without a student, to train a calibration generator (``dfkt.quantize``)."""
    features = teacher.forward_features(images)
    logits = teacher.classify(features)
    l_oh = losses.one_hot_loss(logits)
    l_a = losses.activation_loss(features)
    l_ie = losses.class_balance_loss(logits, log_base=10)
    return {"loss": w_oh * l_oh + w_a * l_a + w_ie * l_ie, "oh": l_oh, "a": l_a, "ie": l_ie, "teacher_logits": logits}
