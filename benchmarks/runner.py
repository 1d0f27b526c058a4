"""The pool of `dfkt` subprocesses a benchmark runs: each run is a command and the folder it writes,
started a few at a time in the order given, each with its stderr in a log beside its folder. A run
that finished before is reused, not run again, so an interrupted benchmark continues where it
stopped; a failed run is reported, never dropped, and the others go on."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

NOT_RUN = "not run"  # the failure a --report-only report gives a run that has not finished


@dataclass(frozen=True)
class Run:
    """One `dfkt` subprocess: the command, and the folder where it writes its summary.json."""

    command: list[str]
    folder: Path


def dfkt_command(*words: str, settings: Iterable[str] = ()) -> list[str]:
    """A `dfkt` command line run with this interpreter (the checkout's dfkt, not whichever is on PATH),
    each of ``settings`` as a `--set`."""
    return [sys.executable, "-m", "dfkt.cli", *words, *(x for s in settings for x in ("--set", s))]


def engine_settings(seed: int, threads: int | None) -> list[str]:
    """The engine part of a run's `--set` settings: its seed, its threads (None: torch's default), and
    no progress bars, which would fill the run's log."""
    return [f"engine.seed={seed}", *([f"engine.threads={threads}"] if threads else []), "engine.progress=false"]


def threads_alone(args: argparse.Namespace) -> int | None:
    """Threads for work done alone before or after the pool (a teacher, a source model, an oracle): all
    the cores the parallel runs share, or torch's default when --threads-per-run is not set."""
    return args.threads_per_run and args.threads_per_run * args.parallel


def finished(run_dir: Path) -> dict | None:
    """A run's summary.json, or None while the run has not finished. Its curve is checkpointed, so
    a resumed run has no duplicates from the process that was killed (metrics.jsonl keeps those)."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_logged(run: Run, describe: Callable[[dict], str]) -> dict:
    """One run's summary, reused if finished, else run now, its stderr in FOLDER.log. ``describe``
    puts the summary in a few words for the progress line. A failure gives {"failed": last line of
    its log, "log": path}."""
    summary = finished(run.folder)
    if summary is not None:
        print(f"{run.folder}: reused, {describe(summary)}", flush=True)
        return summary
    log = run.folder.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as stderr:
        code = subprocess.run(run.command, stdout=subprocess.DEVNULL, stderr=stderr).returncode
    summary = finished(run.folder)
    if code == 0 and summary is not None:
        print(f"{run.folder}: {describe(summary)} in {time.perf_counter() - started:.0f} s", flush=True)
        return summary
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    failure = lines[-1] if lines else f"exit code {code} with an empty log"
    print(f"{run.folder}: FAILED: {failure}", flush=True)
    return {"failed": failure, "log": str(log)}


Job = TypeVar("Job", bound=Hashable)


def run_pool(
    runs: dict[Job, Run], parallel: int, describe: Callable[[dict], str], report_only: bool = False
) -> dict[Job, dict]:
    """Each run's summary (or {"failed": ...}) by its job, ``parallel`` runs at a time, started in the
    order of ``runs`` (put the runs an interrupted benchmark should have first, first). With
    ``report_only``, nothing is started: a run not finished counts as failed with NOT_RUN, and a pool
    none of whose runs has finished is an error (its report would only overwrite an earlier one)."""
    if report_only and runs and all(finished(r.folder) is None for r in runs.values()):
        folder = next(iter(runs.values())).folder
        raise SystemExit(
            f"--report-only: none of the {len(runs)} runs has finished (the first would be "
            f"{folder}): nothing to report; check --work, or run without --report-only"
        )

    def one(run: Run) -> dict:
        if report_only and finished(run.folder) is None:
            return {"failed": NOT_RUN}
        return run_logged(run, describe)

    pool = ThreadPoolExecutor(parallel)
    try:
        return dict(zip(runs, pool.map(one, runs.values())))
    finally:  # on Ctrl-C, start no further run (the running ones got the interrupt too)
        pool.shutdown(cancel_futures=True)
