"""B2: RDSKD on Fashion-MNIST, LeNet-5 -> LeNet-5-half, cpu preset, accuracy at wall-time budgets.

    python benchmarks/rdskd_fmnist.py --seeds 1 2 3 --budget 600

Writes benchmarks/results/rdskd_fmnist.{json,md}. Finished runs are reused, so an interrupted
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import accuracy_at, machine, mean_std, time_to_reach, write

from dfkt import api

CHECKPOINTS = (120, 300, 600)


def finished(run_dir: Path) -> dict | None:
    return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per run")
    parser.add_argument("--work", default="runs/bench-rdskd-fmnist", help="folder for the runs")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra distill settings")
    args = parser.parse_args()
    work = Path(args.work)

    teacher = finished(work / "teacher") or api.train_teacher("lenet5", "fmnist", 15, out=work / "teacher",
                                                             resume=True)
    runs = {}
    for seed in args.seeds:
        done = finished(work / f"seed{seed}")
        if done is not None:
            runs[seed] = done  # finished earlier: reused, not retrained
            continue
        started = time.perf_counter()
        runs[seed] = api.distill("rdskd", teacher["model_file"], "lenet5_half", "cpu", max_seconds=args.budget,
                                 overrides=[f"engine.seed={seed}", "eval_every=1000", *args.overrides],
                                 out=work / f"seed{seed}", resume=True, references=seed == args.seeds[0])
        print(f"seed {seed}: {runs[seed]['student_acc']:.4f} in {time.perf_counter() - started:.0f}s", flush=True)

    budgets = [b for b in CHECKPOINTS if b <= args.budget]
    at = {b: [accuracy_at(work / f"seed{s}", b) for s in args.seeds] for b in budgets}
    reach = {a: [time_to_reach(work / f"seed{s}", a) for s in args.seeds] for a in (0.80, 0.85)}
    refs = runs[args.seeds[0]]["references"]
    first = runs[args.seeds[0]]
    lines = ["# RDSKD on Fashion-MNIST (LeNet-5 -> LeNet-5-half), cpu preset",
             "", f"`python benchmarks/rdskd_fmnist.py --seeds {' '.join(map(str, args.seeds))} --budget {args.budget:g}`"
             f" on {machine()['cpu']}, {machine()['threads']} threads, torch {machine()['torch']}, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| model | test accuracy (%) |", "|---|---|",
             f"| teacher LeNet-5 | {100 * teacher['teacher_acc']:.1f} |",
             f"| student, trained on labels | {100 * refs['labels']['student_acc']:.1f} |",
             f"| student, KD on real data | {100 * refs['kd_real']['student_acc']:.1f} |"]
    lines += [f"| RDSKD student at {b} s (mean ± std over seeds; n/a: generator still training) | "
              f"{mean_std(at[b])} |" for b in budgets]
    lines += [f"| RDSKD student, final | {mean_std([r['student_acc'] for r in runs.values()])} |",
              f"| RDSKD student, best-on-test (oracle, not a deployable pick) | "
              f"{mean_std([r['student_best_on_test_acc'] for r in runs.values()])} |", "",
              "Time to reach 80% / 85% (s, per seed; - = not reached): "
              + " / ".join(", ".join("-" if t is None else f"{t:.0f}" for t in reach[a]) for a in reach), "",
              "Seconds of synthesis (generator training plus pool filling) per run: "
              + ", ".join(f"{r['seconds']['synthesis']:.0f}" for r in runs.values()) + "; sample class histogram "
              f"(seed {args.seeds[0]}): {first['samples']['class_histogram']}, teacher confidence "
              f"{first['samples']['teacher_confidence']:.2f}.", ""]
    data = {"machine": machine(), "seeds": args.seeds, "budget": args.budget, "teacher": teacher,
            "accuracy_at": {str(b): v for b, v in at.items()}, "time_to_reach": {str(a): v for a, v in reach.items()},
            "runs": {str(s): r for s, r in runs.items()}}
    write(Path(args.out), "rdskd_fmnist", data, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
