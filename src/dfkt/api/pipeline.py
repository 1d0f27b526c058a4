"""The one run pipeline of the training commands (distill, adapt, train-teacher, train-source):
resolved config -> run folder -> engine -> method -> run -> summary -> weights.

A command resolves and checks its config and loads what it needs before anything is created on
disk, then describes the rest as a ``Job``; ``run`` makes the run folder, opens the engine (closed
however the run ends), has the job put its method on the engine, runs it (checkpoints, resume,
evaluations, budget), has the job summarise the result, and writes the weights and ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel
from torch import nn

from dfkt.config import EngineConfig, dump_yaml
from dfkt.engine import Engine
from dfkt.engine.engine import RunResult, Stage, Stateful
from dfkt.models.files import ModelInfo, save_model
from dfkt.runs import make_run_dir, write_json


@dataclass
class Training:
    """A method on the engine (a DFKD or adaptation method, or a trainer on labels) and how the engine
    runs it."""

    method: Stateful  # what the checkpoint holds
    stages: list[Stage]
    settings: dict[str, Any]  # what decides the result: a resumed run must have the same
    on_eval: Callable[[], dict[str, Any]] | None = None
    eval_every: int | None = None
    eval_seconds: float | None = None
    max_seconds: float | None = None


@dataclass
class Outcome:
    summary: dict[str, Any]
    weights: dict[str, tuple[nn.Module, ModelInfo]] = field(default_factory=dict)  # file in the run folder


class Job(Protocol):
    """One command's run between its resolved config and its summary."""

    kind: str  # the default run folder's prefix, e.g. "distill-rdskd"
    engine_config: EngineConfig
    resolved: BaseModel  # written as config.yaml, in the shape --config reads

    def start(self, engine: Engine) -> Training:
        """Build the method on ``engine``."""

    def summarize(self, engine: Engine, result: RunResult) -> Outcome:
        """The summary and the weights to write, from the finished run."""


def run(job: Job, out: str | Path | None, resume: bool) -> dict[str, Any]:
    """Run ``job`` in the run folder ``out`` (continuing it with ``resume``); returns the summary."""
    run_dir = make_run_dir(out, job.kind, resume)
    with Engine(job.engine_config, run_dir) as engine:
        training = job.start(engine)
        result = engine.run(
            training.stages,
            training.method,
            training.settings,
            training.on_eval,
            training.eval_every,
            training.max_seconds,
            resume,
            on_start=lambda: dump_yaml(job.resolved, engine.run_dir / "config.yaml"),
            eval_seconds=training.eval_seconds,
        )
        outcome = job.summarize(engine, result)
        if engine.is_main:  # the weights before summary.json, which marks a finished run
            for name, (model, info) in outcome.weights.items():
                save_model(model, info, engine.run_dir / name)
            write_json(engine.run_dir / "summary.json", outcome.summary)
    return outcome.summary
