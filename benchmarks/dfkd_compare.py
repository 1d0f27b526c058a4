"""Compare DFKD methods on one benchmark: accuracy at wall-clock budgets, time to reach, curves, samples.

    python benchmarks/dfkd_compare.py --bench b2 --seeds 1 2 3

Benches (protocols in BENCHMARKS.md): b1 digits, digits_cnn -> digits_cnn_half; b2 Fashion-MNIST,
lenet5 -> lenet5_half; b2-wrn Fashion-MNIST, wrn16_2 -> wrn16_1. Every method runs its cpu preset.
Each (method, seed) run is a `dfkt distill` subprocess in WORK/METHOD/seedS, its stderr in
WORK/METHOD/seedS.log. A run that has a summary.json is reused, so an interrupted benchmark continues
where it stopped; after changing --set or --budget, use a new --work. Writes
OUT/dfkd_compare_BENCH.{json,md,png} and the sample grids in OUT/dfkd_compare_BENCH/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from flags import add_pool_arguments, add_report_arguments, add_settings_argument  # noqa: E402
from report import (  # noqa: E402
    accuracy_at,
    analysis_section,
    command_line,
    heading,
    mean_std,
    pool_machine,
    threads_per_run,
    time_to_reach,
    today,
    write,
)
from runner import Run, dfkt_command, engine_settings, finished, run_pool  # noqa: E402

from dfkt import api  # noqa: E402
from dfkt.config import EngineConfig, RealTrainingConfig  # noqa: E402
from dfkt.data import load_dataset  # noqa: E402
from dfkt.engine import Engine  # noqa: E402
from dfkt.models.files import load_model, read_info  # noqa: E402
from dfkt.registry import METHODS  # noqa: E402


@dataclass(frozen=True)
class Bench:
    title: str
    data: str
    teacher: str
    teacher_epochs: int
    student: str
    budget: float  # default training seconds per run
    checkpoints: tuple[float, ...]  # budgets the table reports accuracy at
    reach: tuple[float, ...]  # accuracies whose time to reach is reported
    eval_every: int  # student steps between test evaluations: enough points for the curve ...
    eval_seconds: float  # ... and training seconds, so methods with slow steps get points too
    teacher_has_batchnorm: bool = True  # else the BatchNorm-prior methods run with params.w_bn=0


BENCHES = {
    "b1": Bench(
        "B1: digits, digits_cnn -> digits_cnn_half",
        "digits",
        "digits_cnn",
        30,
        "digits_cnn_half",
        60,
        (15, 30, 60),
        (),
        50,
        5,
    ),
    "b2": Bench(
        "B2: Fashion-MNIST, LeNet-5 -> LeNet-5-half",
        "fmnist",
        "lenet5",
        15,
        "lenet5_half",
        600,
        (120, 300, 600),
        (0.80, 0.85),
        200,
        30,
        teacher_has_batchnorm=False,
    ),
    "b2-wrn": Bench(
        "B2: Fashion-MNIST, WRN-16-2 -> WRN-16-1",
        "fmnist",
        "wrn16_2",
        15,
        "wrn16_1",
        600,
        (120, 300, 600),
        (0.80, 0.85),
        200,
        30,
    ),
}


def parse_args() -> argparse.Namespace:
    methods = api.list_names("methods")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bench",
        required=True,
        choices=BENCHES,
        help="b1: digits (default budget 60 s); b2: Fashion-MNIST LeNet-5 pair (600 s); "
        "b2-wrn: Fashion-MNIST WRN pair (600 s)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=methods,
        default=methods,
        metavar="METHOD",
        help=f"methods to compare (default: every registered one: {', '.join(methods)})",
    )
    add_pool_arguments(parser)
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="wall-clock training seconds per run (default: the bench's); accuracy is also "
        "reported at the bench's shorter budgets",
    )
    parser.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="folder for the teacher and the runs (default: runs/bench-dfkd-compare-BENCH)",
    )
    add_report_arguments(parser, "report name (default dfkd_compare_BENCH); e.g. for a run of some methods only")
    parser.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="skip the students trained on real data (labels; KD): on the WRN pair they take "
        "about 15 minutes each; the report then says they were not run",
    )
    add_settings_argument(parser, "distill", "params.pool_size=10000")
    args = parser.parse_args()
    bench = BENCHES[args.bench]
    args.budget = args.budget or bench.budget
    args.work = args.work or Path(f"runs/bench-dfkd-compare-{args.bench}")
    return args


def run_dir(work: Path, method: str, seed: int) -> Path:
    return work / method / f"seed{seed}"


def distill_run(
    args: argparse.Namespace, bench: Bench, method: str, seed: int, settings: list[str], folder: Path
) -> Run:
    """One `dfkt distill` run with the teacher in WORK/teacher: the method's cpu preset for --budget
    seconds, the bench's evaluations, then ``settings``; --resume makes a run killed midway continue."""
    settings = [
        *engine_settings(seed, args.threads_per_run),
        f"eval_every={bench.eval_every}",
        f"eval_seconds={bench.eval_seconds:g}",
        *prior_off(bench, method),
        *settings,
    ]
    return Run(
        dfkt_command(
            "distill",
            "--method",
            method,
            "--teacher",
            str(args.work / "teacher"),
            "--student",
            bench.student,
            "--preset",
            "cpu",
            "--max-seconds",
            f"{args.budget:g}",
            "--out",
            str(folder),
            "--resume",
            settings=settings,
        ),
        folder,
    )


def prior_off(bench: Bench, method: str) -> list[str]:
    """A teacher without BatchNorm has no statistics to match: the methods built on them (a prior on by default;
    RDSKD's is opt-in and leaves itself out on such a teacher) run without it."""
    field = METHODS.get(method).Config.model_fields.get("w_bn")
    uses_prior = field is not None and field.default > 0
    return [] if bench.teacher_has_batchnorm or not uses_prior else ["params.w_bn=0"]


def describe(summary: dict) -> str:
    return f"student {summary['student_acc']:.4f}"


def run_all(args: argparse.Namespace, bench: Bench) -> dict[str, dict[int, dict]]:
    """Every (method, seed) run, --parallel at a time, seed by seed: an interrupted benchmark has
    every method at its first seeds rather than some methods at all seeds."""
    runs = {
        (m, s): distill_run(args, bench, m, s, args.overrides, run_dir(args.work, m, s))
        for s in args.seeds
        for m in args.methods
    }
    done = run_pool(runs, args.parallel, describe)
    return {m: {s: done[m, s] for s in args.seeds} for m in args.methods}


def budgets(bench: Bench, budget: float) -> list[float]:
    """The budgets reported: the bench's ones below the run budget, then the run budget itself."""
    return [b for b in bench.checkpoints if b < budget] + [budget]


def reference_students(work: Path, bench: Bench) -> dict:
    """The students trained on real data (labels; KD, τ 4), alone on the machine after the runs (an
    interrupted benchmark has its method runs first)."""
    done = work / "references.json"
    if done.is_file():
        return json.loads(done.read_text())
    teacher_file = work / "teacher" / "model.safetensors"
    info = read_info(teacher_file)
    dataset = load_dataset(bench.data, None, False, info.image_size)
    engine_cfg = EngineConfig(progress=False)
    teacher = Engine(engine_cfg).prepare(load_model(teacher_file)[0], trainable=False)
    out = api.train_references(
        engine_cfg,
        RealTrainingConfig(temperature=4.0),
        info,
        dataset,
        bench.student,
        teacher,
        work / "references",
        resume=True,
    )
    done.write_text(json.dumps(out, indent=2))
    return out


def results(
    args: argparse.Namespace, bench: Bench, teacher: dict, references: dict, runs: dict[str, dict[int, dict]]
) -> dict:
    """Everything the report shows, as written to the JSON file. A failed run counts as None."""
    return {
        "command": command_line(),
        "date": today(),
        "machine": pool_machine(
            args.parallel, args.threads_per_run, (run_dir(args.work, m, s) for m, seeds in runs.items() for s in seeds)
        ),
        "bench": {
            "name": args.bench,
            **asdict(bench),
            "budget": args.budget,
            "seeds": args.seeds,
            "methods": args.methods,
            "overrides": args.overrides,
            "work": str(args.work),
        },
        "teacher": teacher,
        "references": references,
        "runs": runs,
        "accuracy_at": {
            m: {
                f"{b:g}": [accuracy_at(r.get("curve", []), b) for r in seeds.values()]
                for b in budgets(bench, args.budget)
            }
            for m, seeds in runs.items()
        },
        "time_to_reach": {
            m: {f"{a:g}": [time_to_reach(r.get("curve", []), a) for r in seeds.values()] for a in bench.reach}
            for m, seeds in runs.items()
        },
        "failures": {m: {s: r["failed"] for s, r in seeds.items() if "failed" in r} for m, seeds in runs.items()},
    }


def mean_seconds(seeds: dict[int, dict], part: str) -> str:
    values = [r["seconds"][part] for r in seeds.values() if "failed" not in r]
    return f"{statistics.mean(values):.0f}" if values else "n/a"


def reach_cell(seeds: dict[int, dict], times: list[float | None]) -> str:
    """Per-seed seconds to reach an accuracy: '-' not reached, 'failed' for a failed run."""
    return ", ".join(
        "failed" if "failed" in r else "-" if t is None else f"{t:.0f}" for r, t in zip(seeds.values(), times)
    )


def method_table(data: dict) -> list[str]:
    """One row per method: accuracy at each budget, final, oracle best, stage seconds, time to reach."""
    at, reach = data["accuracy_at"], data["time_to_reach"]
    head = [f"at {b} s" for b in next(iter(at.values()))] + [
        "final",
        "best-on-test (oracle)",
        "synthesis s",
        "student s",
    ]
    head += [f"to {100 * float(a):.0f}% (s, per seed)" for a in next(iter(reach.values()))] + ["failed runs"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for method, seeds in data["runs"].items():
        failed = "; ".join(f"seed {s}: {r['failed']}".replace("|", "\\|") for s, r in seeds.items() if "failed" in r)
        cells = [mean_std(values) for values in at[method].values()]
        cells += [mean_std([r.get(k) for r in seeds.values()]) for k in ("student_acc", "student_best_on_test_acc")]
        cells += [mean_seconds(seeds, "synthesis"), mean_seconds(seeds, "student")]
        cells += [reach_cell(seeds, times) for times in reach[method].values()] + [failed or "none"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def best_at(data: dict) -> list[str]:
    """For each budget, the method(s) with the highest mean accuracy over the runs that had one."""
    lines = []
    for budget in next(iter(data["accuracy_at"].values())):
        means = {
            m: statistics.mean(present)
            for m, at in data["accuracy_at"].items()
            if (present := [v for v in at[budget] if v is not None])
        }
        if not means:
            lines.append(f"- {budget} s: no student evaluated yet")
            continue
        top = [m for m, v in means.items() if v == max(means.values())]
        lines.append(
            f"- {budget} s: "
            + ", ".join(f"{m} ({mean_std(data['accuracy_at'][m][budget])})" for m in top)
            + level_with(data, budget, means, top[0])
        )
    return lines


def level_with(data: dict, budget: str, means: dict[str, float], best: str) -> str:
    """The runners-up whose mean lies within one standard deviation (over seeds) of the best's mean:
    with three seeds the order between them is not established."""
    present = [v for v in data["accuracy_at"][best][budget] if v is not None]
    if len(present) < 2:
        return ""
    floor = means[best] - statistics.stdev(present)
    close = [m for m, v in sorted(means.items(), key=lambda kv: -kv[1]) if m != best and v >= floor]
    return (
        (
            "; level within its seed spread: "
            + ", ".join(f"{m} ({mean_std(data['accuracy_at'][m][budget])})" for m in close)
        )
        if close
        else ""
    )


def copy_grids(data: dict, work: Path, folder: Path) -> dict[str, tuple[int, dict]]:
    """Each method's first finished seed and its summary; its sample grid is copied to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shown = {}
    for method, seeds in data["runs"].items():
        ok = [(s, r) for s, r in seeds.items() if "failed" not in r]
        if ok:
            seed, summary = shown[method] = ok[0]
            shutil.copy(run_dir(work, method, seed) / summary["samples"]["grid"], folder / f"{method}.png")
    return shown


def method_sections(data: dict, shown: dict[str, tuple[int, dict]], grids: str) -> list[str]:
    """Per method: the teacher-predicted class histogram of its samples, confidence, warnings, grid."""
    lines = []
    for method, seeds in data["runs"].items():
        lines += [f"### {method}", ""]
        if method not in shown:
            lines += ["Every run failed: no samples.", ""]
            continue
        seed, summary = shown[method]
        warnings = [f"seed {s}: {w}" for s, r in seeds.items() for w in r.get("warnings", [])]
        lines += [
            f"- Class histogram of 500 samples, teacher-predicted (seed {seed}): "
            f"{summary['samples']['class_histogram']}",
            f"- Teacher confidence on them (seed {seed}): {summary['samples']['teacher_confidence']:.2f}",
            "- Warnings: " + ("none" if not warnings else "; ".join(warnings)),
            "",
            f"![{method} samples, seed {seed}]({grids}/{method}.png)",
            "",
        ]
    return lines


def markdown(data: dict, bench: Bench, shown: dict, grids: str, analysis: str | None) -> str:
    m, refs, teacher = data["machine"], data["references"], data["teacher"]

    def ref(name: str) -> str:
        if name not in refs:
            return "not run (--no-references)"
        return f"{100 * refs[name]['student_acc']:.1f} ({refs[name]['seconds']:.0f} s)"

    lines = [
        *heading(f"{bench.title}: DFKD methods compared, cpu preset", data),
        f"Each run is a `dfkt distill` subprocess. Runs side by side: {m['parallel']}; threads per run: "
        f"{threads_per_run(m)}. "
        "Budgets are wall-clock training seconds per run (evaluation and checkpoint writing excluded), so "
        "runs sharing the cores get less compute per second: compare methods within this report only. "
        f"Test accuracy every {bench.eval_every} student steps or {bench.eval_seconds:g} training seconds, "
        "whichever comes first; seeds "
        f"{' '.join(map(str, data['bench']['seeds']))}. The reference students (Adam, 15 epochs; KD at "
        "τ 4) were trained after the runs, alone on the machine, with torch's default threads."
        + (
            ""
            if bench.teacher_has_batchnorm
            else " The teacher has no BatchNorm layers, so the methods built "
            "on its statistics (" + ", ".join(m for m in data["runs"] if prior_off(bench, m)) + ") run with "
            "`params.w_bn=0`: without their main prior."
        ),
        "",
        "| reference | test accuracy (%) (training time) |",
        "|---|---|",
        f"| teacher {bench.teacher} ({bench.teacher_epochs} epochs) | {100 * teacher['teacher_acc']:.1f} |",
        f"| student {bench.student}, trained on labels | {ref('labels')} |",
        f"| student {bench.student}, KD on real data | {ref('kd_real')} |",
        "",
        "Student test accuracy (%), mean ± std over seeds. n/a: no evaluation within that budget (the "
        "student stage had not started); 'k of n runs': the mean is over the runs that had a value. "
        "best-on-test is an oracle (picked on the test set), not a deployable result.",
        "",
        *method_table(data),
        "",
        "## Best at each budget",
        "",
        *best_at(data),
        "",
        "## Methods",
        "",
        *method_sections(data, shown, grids),
        *analysis_section(analysis),
    ]
    return "\n".join(lines)


def mean_curve(curves: list[list[dict]], grid: np.ndarray) -> np.ndarray:
    """Mean over seeds of each curve held step-wise onto ``grid``; NaN until every seed has a value."""
    held = []
    for curve in curves:
        seconds = np.array([e["train_seconds"] for e in curve])
        accuracy = np.array([e["test_acc"] for e in curve])
        index = np.searchsorted(seconds, grid, side="right") - 1
        held.append(np.where(index >= 0, accuracy[np.maximum(index, 0)], np.nan))
    return np.mean(held, axis=0)


def plot(data: dict, bench: Bench, path: Path) -> None:
    """Accuracy against training seconds, one line per method, references dashed."""
    curves = {m: [r["curve"] for r in seeds.values() if r.get("curve")] for m, seeds in data["runs"].items()}
    end = max([data["bench"]["budget"]] + [c[-1]["train_seconds"] for cs in curves.values() for c in cs])
    grid = np.linspace(0, end, 500)
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, method_curves in curves.items():
        if method_curves:
            ax.plot(grid, 100 * mean_curve(method_curves, grid), label=f"{method} (mean of {len(method_curves)})")
    refs = {
        "teacher": data["teacher"]["teacher_acc"],
        **{
            label: data["references"][k]["student_acc"]
            for k, label in (("labels", "student on labels"), ("kd_real", "student, KD on real data"))
            if k in data["references"]
        },
    }
    for (label, acc), color in zip(refs.items(), ("black", "tab:gray", "silver")):
        ax.axhline(100 * acc, linestyle="--", color=color, linewidth=1, label=f"{label} ({100 * acc:.1f})")
    ax.set(
        xlabel="training seconds (wall clock)",
        ylabel="student test accuracy (%)",
        xlim=(0, end),
        ylim=(None, 100),
        title=f"{bench.title}, cpu preset",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    bench = BENCHES[args.bench]
    teacher = finished(args.work / "teacher") or api.train_teacher(
        bench.teacher, bench.data, bench.teacher_epochs, out=args.work / "teacher", resume=True
    )
    runs = run_all(args, bench)
    references = reference_students(args.work, bench) if args.references else {}
    data = results(args, bench, teacher, references, runs)
    name = args.name or f"dfkd_compare_{args.bench}"
    shown = copy_grids(data, args.work, args.out / name)
    report = markdown(data, bench, shown, name, args.analysis)
    write(args.out, name, data, report)
    plot(data, bench, args.out / f"{name}.png")
    print(report)


if __name__ == "__main__":
    main()
