"""Helpers shared by the benchmark scripts: machine facts, running `dfkt` subprocesses side by side
with a log each, finished runs and their accuracy curves."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from dfkt.engine.metrics import cpu_model


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def command_line() -> str:
    """The command that produced a report, so it can be rerun as written."""
    return "python " + shlex.join(sys.argv)


def positive_int(text: str) -> int:
    """argparse type for counts (--parallel, --threads-per-run): a typo fails before any run."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def engine_settings(seed: int, threads: int | None) -> list[str]:
    """The engine part of a run's `--set` settings: its seed, its threads (None: torch's default), and
    no progress bars, which would fill the run's log."""
    return [f"engine.seed={seed}", *([f"engine.threads={threads}"] if threads else []), "engine.progress=false"]


def set_flags(settings: Iterable[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]`` for a `dfkt` command line."""
    return [x for s in settings for x in ("--set", s)]


def run_logged(command: list[str], folder: Path, describe: Callable[[dict], str]) -> dict:
    """One run's summary, reused if finished, else run now, its stderr in FOLDER.log. ``describe``
    puts the summary in a few words for the progress line. A failure gives {"failed": last line of
    its log, "log": path} and leaves the other runs to go on: the report lists it, never drops it."""
    summary = finished(folder)
    if summary is not None:
        print(f"{folder}: reused, {describe(summary)}", flush=True)
        return summary
    log = folder.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as stderr:
        code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr).returncode
    summary = finished(folder)
    if code == 0 and summary is not None:
        print(f"{folder}: {describe(summary)} in {time.perf_counter() - started:.0f} s", flush=True)
        return summary
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    failure = lines[-1] if lines else f"exit code {code} with an empty log"
    print(f"{folder}: FAILED: {failure}", flush=True)
    return {"failed": failure, "log": str(log)}


Job = TypeVar("Job", bound=Hashable)


def run_in_parallel(jobs: Sequence[Job], one: Callable[[Job], dict], parallel: int) -> dict[Job, dict]:
    """``one(job)`` for every job, ``parallel`` at a time, started in the order given (put the jobs an
    interrupted benchmark should have first, first)."""
    pool = ThreadPoolExecutor(parallel)
    try:
        return dict(zip(jobs, pool.map(one, jobs)))
    finally:  # on Ctrl-C, start no further run (the running ones got the interrupt too)
        pool.shutdown(cancel_futures=True)


def precisions(run_dirs: Iterable[Path]) -> list[str]:
    """The precisions the runs resolved (engine.precision=auto depends on the CPU)."""
    files = [Path(d) / "env.json" for d in run_dirs]
    return sorted({json.loads(f.read_text())["precision"] for f in files if f.is_file()})


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
    """"mean ± std" in percent, saying how many runs had a value when some had none; a single
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
