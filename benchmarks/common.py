"""Helpers shared by the benchmark scripts: machine facts and reading a run's accuracy curve."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from dfkt.engine.metrics import cpu_model, read_metrics


def machine() -> dict:
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def accuracy_at(run_dir: Path, seconds: float) -> float | None:
    """Test accuracy of the last evaluation made within ``seconds`` of training time."""
    evals = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("event") == "eval"]
    within = [r["test_acc"] for r in evals if r["train_seconds"] <= seconds + 1.0]
    return within[-1] if within else None


def time_to_reach(run_dir: Path, accuracy: float) -> float | None:
    for r in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if r.get("event") == "eval" and r["test_acc"] >= accuracy:
            return r["train_seconds"]
    return None


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def write(out: Path, name: str, data: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(markdown)
