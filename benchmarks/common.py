"""Helpers shared by the benchmark scripts: machine facts and reading a run's accuracy curve."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from dfkt.engine.metrics import cpu_model


def machine() -> dict:
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def curve(run_dir: Path) -> list[dict]:
    """The run's test-accuracy curve from summary.json: checkpointed, so a resumed run has no
    duplicates from the process that was killed (metrics.jsonl keeps those)."""
    return json.loads((Path(run_dir) / "summary.json").read_text())["curve"]


def accuracy_at(run_dir: Path, seconds: float) -> float | None:
    """Test accuracy of the last evaluation made within ``seconds`` of training time."""
    within = [r["test_acc"] for r in curve(run_dir) if r["train_seconds"] <= seconds + 1.0]
    return within[-1] if within else None


def time_to_reach(run_dir: Path, accuracy: float) -> float | None:
    return next((r["train_seconds"] for r in curve(run_dir) if r["test_acc"] >= accuracy), None)


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
