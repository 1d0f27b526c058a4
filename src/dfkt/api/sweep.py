"""``dfkt sweep``: a method over a space of settings and seeds, persisted in an Optuna storage."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfkt.commands import SWEEP
from dfkt.config import dump_yaml, validate
from dfkt.errors import ConfigError
from dfkt.registry import METHODS
from dfkt.runs import write_json
from dfkt.sweep import SweepConfig, aggregate, markdown, open_storage, open_study, plan, requeue_failed, work

STUDY = "dfkt-sweep"


def resolve_sweep_config(
    grid: str | Path | dict | None = None, *args: Any, overrides: Sequence[str] = (), **settings: Any
) -> SweepConfig:
    """The validated sweep: the sweep file (or dict) ``grid`` <- settings; ``overrides`` join the file's."""
    raw = SWEEP.layered(args, settings, grid)
    raw["overrides"] = [*raw.get("overrides", []), *overrides]
    cfg = validate(SweepConfig, raw, where=SWEEP.where)
    METHODS.get(cfg.method)
    if not cfg.teacher:
        raise ConfigError("no teacher given; pass --teacher FILE (or teacher: in the sweep file)")
    return cfg


def _worker(cfg: dict, storage_url: str, out: str) -> None:
    study = open_study(open_storage(storage_url), STUDY, plan(SweepConfig(**cfg)))
    work(SweepConfig(**cfg), study, Path(out), _print)


def _print(line: str) -> None:
    print(f"dfkt sweep: {line}", file=sys.stderr, flush=True)


def sweep(
    grid: str | Path | dict | None = None,
    *args: Any,
    overrides: Sequence[str] = (),
    out: str | Path = "runs/sweep",
    storage: str | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Run (or join, or resume) a sweep and return its aggregate.

    ``grid`` is a YAML file or dict with ``grid:`` (setting -> values, every combination),
    ``points:`` (a list of explicit settings) and/or ``random:`` (setting -> {low, high, log} or a list of
    choices) with ``random_trials:``; its other
    keys are defaults for the settings (those of ``dfkt sweep --help``: by keyword, or method, teacher,
    preset, seeds, max_seconds by position after ``grid``), and ``overrides`` (``--set``) join its own.
    Trials live in ``storage`` (default OUT/study.journal; a database URL such as
    sqlite:///sweep.db or postgresql://... works too), run folders in OUT/trials/KEY. ``workers``
    processes here share the study; more machines join it by running the same command with the
    same storage and a shared OUT. Trials whose runs failed are run again only with ``retry_failed``.
    """
    cfg = resolve_sweep_config(grid, *args, overrides=overrides, **settings)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or str(out / "study.journal")
    study = open_study(open_storage(storage_url), STUDY, plan(cfg))
    if retry_failed:
        _print(f"failed trials queued again: {requeue_failed(study)}")
    dump_yaml(cfg, out / "sweep.yaml")
    context = multiprocessing.get_context("spawn")
    others = [
        context.Process(target=_worker, args=(cfg.model_dump(), storage_url, str(out))) for _ in range(workers - 1)
    ]
    for process in others:
        process.start()
    work(cfg, study, out, _print)
    for process in others:
        process.join()
    result = {**aggregate(cfg, study), "storage": storage_url}
    write_json(out / "sweep.json", result)
    (out / "sweep.md").write_text(markdown(result))
    return result
