"""Helpers shared by the benchmark scripts: machine facts, finished runs and their accuracy curves."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

from dfkt.engine.metrics import cpu_model


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def command_line() -> str:
    """The command that produced a report, so it can be rerun as written."""
    return "python " + shlex.join(sys.argv)


def finished(run_dir: Path) -> dict | None:
    """A run's summary.json, or None while the run has not finished. Its curve is checkpointed, so
    a resumed run has no duplicates from the process that was killed (metrics.jsonl keeps those)."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def accuracy_at(curve: list[dict], seconds: float) -> float | None:
    """Test accuracy of the last evaluation made within ``seconds`` of training time."""
    within = [r["test_acc"] for r in curve if r["train_seconds"] <= seconds + 1.0]
    return within[-1] if within else None


def time_to_reach(curve: list[dict], accuracy: float) -> float | None:
    return next((r["train_seconds"] for r in curve if r["test_acc"] >= accuracy), None)


def mean_std(values: list[float | None]) -> str:
    """"mean ± std" in percent, saying how many runs had a value when some had none."""
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    text = f"{100 * statistics.mean(present):.1f} ± {100 * std:.1f}"
    return text if len(present) == len(values) else f"{text} ({len(present)} of {len(values)} runs)"


def write(out: Path, name: str, data: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(markdown)
