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
    params = {
        "gen_batch": 64,
        "gen_epochs": 1,
        "gen_steps_per_epoch": 20,
        "student_batch": 64,
        "student_epochs": 1,
        "student_steps_per_epoch": 40,
        "pool_size": 512,
        **extra,
    }
    return FAST_ENGINE + [f"params.{k}={v}" for k, v in params.items()] + ["eval_every=20"]


class FakeClock:
    """The engine's clock, moved only by the test, so budgets and evaluation schedules are checked by
    counting, not by timing on a machine whose load varies: ``advance`` it by hand, wrap a step with
    ``ticking`` to make each call take a set time, or give ``per_read`` to move it on every reading."""

    def __init__(self, per_read: float = 0.0):
        self.now = 0.0
        self.per_read = per_read

    def perf_counter(self) -> float:
        now = self.now
        self.now += self.per_read
        return now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def ticking(self, seconds: float, step, record: list | None = None):
        """``step`` taking ``seconds`` of this clock, its step numbers appended to ``record``."""

        def timed(i):
            self.now += seconds
            if record is not None:
                record.append(i)
            return step(i)

        return timed


def fake_clock(monkeypatch, per_read: float = 0.0) -> FakeClock:
    """A FakeClock in place of the engine's (only the engine's: other code keeps the real time)."""
    from types import SimpleNamespace

    import dfkt.engine.engine as engine_module

    clock = FakeClock(per_read)
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return clock
