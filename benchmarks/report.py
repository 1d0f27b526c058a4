"""What the benchmark reports share: the machine and the command that made them, the line that
states both, statistics over seeds and accuracy curves, and writing the JSON and markdown files."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from dfkt.engine.cpu import cpu_model


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def command_line() -> str:
    """The command that produced a report, so it can be rerun as written."""
    return "python " + shlex.join(sys.argv)


def precisions(run_dirs: Iterable[Path]) -> list[str]:
    """The precisions the runs resolved (engine.precision=auto depends on the CPU)."""
    files = [Path(d) / "env.json" for d in run_dirs]
    return sorted({json.loads(f.read_text())["precision"] for f in files if f.is_file()})


def today() -> str:
    return time.strftime("%Y-%m-%d")


def pool_machine(parallel: int, threads_per_run: int | None, run_dirs: Iterable[Path]) -> dict:
    """The machine of a report whose runs shared it (runner.run_pool), as its JSON file records it."""
    return {**machine(), "threads_per_run": threads_per_run, "parallel": parallel, "precision": precisions(run_dirs)}


def machine_line(machine: dict, precision: list[str]) -> str:
    """The machine as a report states it: "CPU, N cores, torch V, precision P"."""
    return (
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"precision {', '.join(precision) or 'n/a'}"
    )


def threads_per_run(pool_machine: dict) -> str:
    """The threads of each pooled run as a report states them."""
    return str(pool_machine["threads_per_run"] or f"torch's default, {pool_machine['threads']}")


def heading(title: str, data: dict) -> list[str]:
    """A pooled report's first lines: its title, the command that made it, the machine and the date."""
    m = data["machine"]
    return [f"# {title}", "", f"`{data['command']}`", "", f"{machine_line(m, m['precision'])}, {data['date']}.", ""]


def analysis_section(analysis: str | None) -> list[str]:
    """The hand-written analysis (--analysis) at the end of a report, if there is one."""
    return ["## Analysis", "", analysis.strip(), ""] if analysis else []


def accuracy_at(curve: list[dict], seconds: float) -> float | None:
    """Test accuracy of the last evaluation made within ``seconds`` of training time."""
    within = [r["test_acc"] for r in curve if r["train_seconds"] <= seconds + 1.0]
    return within[-1] if within else None


def time_to_reach(curve: list[dict], accuracy: float) -> float | None:
    return next((r["train_seconds"] for r in curve if r["test_acc"] >= accuracy), None)


def mean_std(values: list[float | None]) -> str:
    """ "mean ± std" in percent, saying how many runs had a value when some had none; a single
    value is shown alone (one run has no spread to report)."""
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    if len(present) == 1:
        text = f"{100 * present[0]:.1f}"
    else:
        text = f"{100 * statistics.mean(present):.1f} ± {100 * statistics.stdev(present):.1f}"
    return text if len(present) == len(values) else f"{text} ({len(present)} of {len(values)} runs)"


def write(out: Path, name: str, data: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(markdown)
