"""Shared fixtures: a tiny digits teacher trained once per test session."""

from __future__ import annotations

import os

import pytest

# Tests run on the CPU in fp32 unless they say otherwise, and never download.
os.environ.setdefault("DFKT_DATA_ROOT", "/nonexistent-dfkt-data")

FAST_ENGINE = ["engine.precision=32-true", "engine.progress=false"]


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> str:
    from dfkt import api

    out = tmp_path_factory.mktemp("teacher")
    summary = api.train_teacher("digits_cnn", "digits", epochs=8, overrides=FAST_ENGINE, out=out)
    assert summary["teacher_acc"] > 0.9
    return summary["model_file"]


def tiny_rdskd(**extra: object) -> list[str]:
    """Overrides for an RDSKD run of a few seconds on digits."""
    params = {"gen_batch": 64, "gen_epochs": 1, "gen_steps_per_epoch": 20, "student_batch": 64,
              "student_epochs": 1, "student_steps_per_epoch": 40, "pool_size": 512, **extra}
    return FAST_ENGINE + [f"params.{k}={v}" for k, v in params.items()] + ["eval_every=20"]
