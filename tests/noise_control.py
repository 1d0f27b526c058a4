"""The control a distillation test compares against: the same student steps, but on Gaussian noise.

A student taught by the teacher on N(0, 1) images (in the teacher's normalised units) learns the teacher from
images that carry no data, and on 8x8 digits it learns a lot (0.79-0.84 in 60-100 steps of 64). A floor over
chance is cleared by noise alone, so a test states its margin over this control: what a method's synthetic
images teach beyond noise (or, at a small budget, how far below it they may fall).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch import Tensor

import dfkt
from dfkt.dfkd.base import DistillMethod, DistillSetup
from dfkt.dfkd.student import StudentTrainer, StudentTrainingConfig
from dfkt.engine import Stage
from dfkt.registry import METHODS

NAME = "gaussian_noise_control"


class GaussianNoise:
    """A synthesizer with nothing to synthesize: every sample is fresh N(0, 1) noise."""

    def __init__(self, setup: DistillSetup):
        self.shape = (setup.channels, setup.image_size, setup.image_size)
        self.device = setup.engine.device

    def synthesize(self) -> dict[str, Tensor | float]:
        return {}

    def sample(self, n: int, rng: torch.Generator) -> tuple[Tensor, None]:
        return torch.randn(n, *self.shape, generator=rng, device=self.device), None


class GaussianNoiseControl(DistillMethod):
    Config = StudentTrainingConfig
    summary = "control: the student learns from the teacher on Gaussian noise"
    presets = {"cpu": {}}

    def __init__(self, cfg: StudentTrainingConfig, setup: DistillSetup):
        super().__init__(cfg, setup)
        self.source = GaussianNoise(setup)
        self.student_trainer = StudentTrainer(self, cfg, self.source)

    def stages(self) -> list[Stage]:
        return [self.student_trainer.stage(train=[], frozen=[self.teacher])]


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """The control under its name in the method registry, for as long as the block runs."""
    METHODS._entries[NAME] = GaussianNoiseControl
    try:
        yield NAME
    finally:
        del METHODS._entries[NAME]


def student_settings(run_dir: Path) -> dict:
    """The student-stage settings a finished run used (its saved params, preset folded in)."""
    params = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["params"]
    return {k: v for k, v in params.items() if k in StudentTrainingConfig.model_fields}


def control_accuracy(teacher: str, settings: dict, run_overrides: list[str], out: Path) -> float:
    """Test accuracy of a student distilled from Gaussian noise with ``settings`` (student steps, batch, lr,
    temperature, augmentation) and ``run_overrides`` (engine, evaluation interval) as the run it controls."""
    overrides = run_overrides + [f"params.{k}={json.dumps(v)}" for k, v in settings.items()]  # JSON is YAML
    with registered() as name:
        return dfkt.distill(name, teacher, overrides=overrides, out=out)["student_acc"]
