"""Ablate one DFKD method's settings on a benchmark: each variant (a set of `--set` settings on top of
the method's cpu preset and a shared base) over several seeds, side by side in one run.

    python benchmarks/ablation.py --bench b2 --method rdskd --seeds 1 2 3 --budget 300 --parallel 2 \\
        --threads-per-run 1 --variant preset: --variant 'w32:params.gen_width=32' \\
        --variant 'w32+aug:params.gen_width=32 params.augment=shift,flip'

A variant is NAME:SETTING SETTING ... (settings separated by spaces; none for the preset itself).
Runs live in WORK/VARIANT/seedS and are reused when finished (a new --budget needs a new --work).
Writes OUT/ablation_BENCH_METHOD.{json,md}: final accuracy, label-free selected accuracy, accuracy at
the bench's shorter budgets, and synthesis vs student seconds, mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from dfkd_compare import BENCHES, budgets, describe, distill_run
from flags import add_pool_arguments, add_report_arguments
from report import accuracy_at, command_line, machine, machine_line, mean_std, precisions, today, write
from runner import run_pool

from dfkt import api
from dfkt.registry import METHODS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True, choices=BENCHES)
    parser.add_argument("--method", required=True, choices=api.list_names("methods"))
    parser.add_argument(
        "--variant",
        dest="variants",
        action="append",
        required=True,
        metavar="NAME:SETTINGS",
        help="a variant: its name, a colon, then space-separated KEY=VALUE settings",
    )
    parser.add_argument(
        "--base", nargs="+", default=[], metavar="KEY=VALUE", help="settings every variant shares (before its own)"
    )
    add_pool_arguments(parser, seeds_help="seeds per variant (default: 1 2 3)")
    parser.add_argument(
        "--budget", type=float, metavar="SECONDS", help="training seconds per run (default: the bench's)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the runs; a teacher is read from DIR/teacher (e.g. a link to the one dfkd_compare.py trained)",
    )
    add_report_arguments(parser, "report name (default: ablation_BENCH_METHOD)", analysis=False)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the finished runs; runs not finished count as not run",
    )
    args = parser.parse_args()
    args.budget = args.budget or BENCHES[args.bench].budget
    args.variants = [parse_variant(v) for v in args.variants]
    return args


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, settings = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: write NAME:KEY=VALUE KEY=VALUE (or NAME: for no settings)")
    return name, settings.split()


def worst(finals: list[float | None]) -> str:
    """The lowest final accuracy in percent, or n/a when no run of the variant finished."""
    present = [f for f in finals if f is not None]
    return f"{min(present) * 100:.1f}" if present else "n/a"


def main() -> None:
    args = parse_args()
    bench = BENCHES[args.bench]
    METHODS.get(args.method)
    if not (args.work / "teacher" / "model.safetensors").is_file():
        raise SystemExit(
            f"no teacher at {args.work / 'teacher'}; train one (dfkt train-teacher --model "
            f"{bench.teacher} --data {bench.data} --epochs {bench.teacher_epochs}) or link it there"
        )
    settings = dict(args.variants)
    planned = {
        (name, seed): distill_run(
            args, bench, args.method, seed, [*args.base, *settings[name]], args.work / name / f"seed{seed}"
        )
        for seed in args.seeds
        for name in settings
    }
    done = run_pool(planned, args.parallel, describe, args.report_only)
    shown = budgets(bench, args.budget)
    rows, data = (
        [],
        {
            "command": command_line(),
            "machine": machine(),
            "date": today(),
            "bench": args.bench,
            "method": args.method,
            "budget": args.budget,
            "base": args.base,
            "variants": {},
        },
    )
    data["precision"] = precisions(run.folder for run in planned.values())
    for name, extra in args.variants:
        runs = [done[name, s] for s in args.seeds]
        ok = [r for r in runs if "failed" not in r]
        finals = [r["student_acc"] if "failed" not in r else None for r in runs]
        selected = [r.get("student_selected_acc") if "failed" not in r else None for r in runs]
        at = [mean_std([accuracy_at(r["curve"], b) if "failed" not in r else None for r in runs]) for b in shown[:-1]]
        seconds = {k: statistics.mean(r["seconds"][k] for r in ok) if ok else None for k in ("synthesis", "student")}
        data["variants"][name] = {"settings": extra, "runs": runs}
        rows.append(
            f"| {name} | {' '.join(extra) or '(preset)'} | "
            + "".join(f"{a} | " for a in at)
            + f"{mean_std(finals)} | {worst(finals)} | "
            f"{mean_std(selected)} | " + " | ".join("—" if v is None else f"{v:.0f}" for v in seconds.values()) + " |"
        )
    head = " | ".join(f"at {b:g} s" for b in shown[:-1])
    markdown = "\n".join(
        [
            f"# Ablation: {args.method} on {bench.title}",
            "",
            f"`{data['command']}`",
            "",
            f"Machine: {machine_line(data['machine'], data['precision'])}; {data['date']}; "
            f"{args.parallel} run(s) side by side"
            + (f", {args.threads_per_run} thread(s) each" if args.threads_per_run else "")
            + ".",
            f"Every run: `--preset cpu --max-seconds {args.budget:g}`"
            + (f" and `{' '.join(args.base)}`" if args.base else "")
            + f"; seeds {', '.join(map(str, args.seeds))}. Accuracy is final test accuracy (mean ± std); *min* is the "
            "worst seed; *selected* is the label-free choice (student_selected).",
            "",
            f"| variant | settings | {head + ' | ' if head else ''}final | min | selected | synthesis s | student s |",
            "|---|---|" + "---|" * (len(shown) - 1) + "---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    name = args.name or f"ablation_{args.bench}_{args.method}"
    write(args.out, name, data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
