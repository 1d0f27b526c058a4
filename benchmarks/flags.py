"""The command-line flags the benchmark scripts share: how the pool runs (seeds, runs side by side,
threads of each), the extra `dfkt` settings, and where the report goes."""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path("benchmarks/results")


def positive_int(text: str) -> int:
    """argparse type for counts (--parallel, --threads-per-run): a typo fails before any run."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def text_of(path: str) -> str:
    """argparse type for a text file given by name, read at once: a typo fails before any run."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None


def add_pool_arguments(
    parser: argparse.ArgumentParser, seeds_help: str = "seeds per method (default: 1 2 3)", threads_note: str = ""
) -> None:
    """--seeds, --parallel and --threads-per-run of a benchmark whose runs are `dfkt` subprocesses
    (runner.run_pool); ``threads_note`` adds what else the threads apply to."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], metavar="SEED", help=seeds_help)
    parser.add_argument(
        "--parallel",
        type=positive_int,
        default=1,
        metavar="N",
        help="runs side by side (default 1); they share the cores, which the report states",
    )
    parser.add_argument(
        "--threads-per-run",
        type=positive_int,
        metavar="T",
        help="CPU threads of each run (engine.threads; default: torch's default)" + threads_note,
    )


def add_settings_argument(parser: argparse.ArgumentParser, command: str, example: str) -> None:
    """--set KEY=VALUE ... (args.overrides): settings passed on to every run's `dfkt COMMAND`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"extra 'dfkt {command} --set' settings for every run, e.g. {example}",
    )


def add_report_arguments(parser: argparse.ArgumentParser, name_help: str | None = None, analysis: bool = True) -> None:
    """--out (the report's folder), --name when ``name_help`` says what it defaults to, and --analysis
    (args.analysis: the file's text, or None) unless ``analysis`` is False."""
    parser.add_argument(
        "--out", type=Path, default=RESULTS, metavar="DIR", help=f"folder for the report (default: {RESULTS})"
    )
    if name_help is not None:
        parser.add_argument("--name", help=name_help)
    if analysis:
        parser.add_argument(
            "--analysis", type=text_of, metavar="FILE", help="text file appended to the report under '## Analysis'"
        )
