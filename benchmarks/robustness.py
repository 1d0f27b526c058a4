"""B3: robustness over hyperparameters (BENCHMARKS.md). Is RDSKD's accuracy steadier across
settings than DAFL's, MSKD's and DeepInversion's?

    python benchmarks/robustness.py --bench digits --seeds 1 2 --budget 20 --workers 2
    python benchmarks/robustness.py --bench fmnist --seeds 1 --budget 120 --workers 2

Every method runs as one `dfkt sweep` (so through the public CLI, trials in an Optuna journal,
resumable) over a shared grid of the settings all generator methods have (generator learning
rate, student learning rate, latent size; DeepInversion's pixel learning rate stands for the
first), then each baseline's own loss weights changed one at a time from its defaults. RDSKD has
no loss weights: the shared grid is all it has to get wrong. Each trial trains for --budget seconds
with the method's cpu preset. The table reports final student accuracy over all of a method's
trials and over the shared grid alone (the like-for-like comparison), beside the label-free
selected student and the best-on-test oracle. Writes OUT/robustness_BENCH.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from flags import add_report_arguments, positive_int  # noqa: E402
from report import analysis_section, command_line, machine, machine_line, precisions, today, write  # noqa: E402
from runner import dfkt_command, finished  # noqa: E402

from dfkt import api  # noqa: E402
from dfkt.sweep import describe  # noqa: E402

BENCHES = {  # data, teacher, teacher epochs, student, teacher has BatchNorm
    "digits": ("digits", "digits_cnn", 30, "digits_cnn_half", True),
    "fmnist": ("fmnist", "lenet5", 15, "lenet5_half", False),
}
GEN_LR = [1e-3, 2e-2, 2e-1]  # RDSKD's default, DAFL's CIFAR-10 and MNIST defaults
STUDENT_LR = [5e-4, 2e-3]
NZ = [64, 256]
OWN_WEIGHTS = {  # each changed alone from the method's defaults
    "rdskd": [],
    "dafl": [{"params.w_ie": 1}, {"params.w_ie": 20}, {"params.w_a": 0}, {"params.w_a": 1}],
    "mskd": [{"params.w_ms": 0.1}, {"params.w_ms": 10}, {"params.w_ie": 1}, {"params.w_ie": 20}],
    "deepinversion": [{"params.w_bn": 1}, {"params.w_bn": 50}, {"params.w_tv": 0}, {"params.w_tv": 1e-4}],
}
METHODS = list(OWN_WEIGHTS)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True, choices=BENCHES)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--budget", type=float, default=20, help="training seconds of each trial (default 20)")
    parser.add_argument(
        "--small-grid",
        action="store_true",
        help="shared grid of the generator learning rate only (3 points, not 12) and two own-weight "
        "settings per baseline (not four)",
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="sweep workers, one core each (default 2)")
    parser.add_argument("--work", type=Path, help="folder of the teacher and the sweeps (default runs/bench-b3-BENCH)")
    add_report_arguments(parser)
    args = parser.parse_args()
    args.work = args.work or Path(f"runs/bench-b3-{args.bench}")
    return args


def shared_grid(method: str, small: bool, teacher_has_bn: bool) -> dict[str, list]:
    lr_key = "params.lr" if method == "deepinversion" else "params.gen_lr"
    lrs = [0.02, 0.1, 0.5] if method == "deepinversion" else GEN_LR  # pixels: DeepInversion's 0.1 in the middle
    grid = {lr_key: lrs}
    if not small:
        grid["params.student_lr"] = STUDENT_LR
        if method != "deepinversion":
            grid["params.nz"] = NZ
    return grid


def sweep_spec(args: argparse.Namespace, method: str, teacher: str) -> dict:
    _, _, _, student, has_bn = BENCHES[args.bench]
    own = [p for p in OWN_WEIGHTS[method] if has_bn or "params.w_bn" not in p][: 2 if args.small_grid else None]
    overrides = ["engine.threads=1", "eval_seconds=5", f"student={student}"]
    if not has_bn and method == "deepinversion":
        overrides.append("params.w_bn=0")  # LeNet-5 has no BatchNorm statistics to match
    return {
        "method": method,
        "teacher": teacher,
        "preset": "cpu",
        "seeds": args.seeds,
        "max_seconds": args.budget,
        "grid": shared_grid(method, args.small_grid, has_bn),
        "points": own,
        "overrides": overrides,
    }


def run_sweep(args: argparse.Namespace, method: str, teacher: str) -> dict:
    folder = args.work / method
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "grid.yaml"
    spec_file.write_text(yaml.safe_dump(sweep_spec(args, method, teacher)))
    started = time.perf_counter()
    command = dfkt_command("sweep", "--grid", str(spec_file), "--out", str(folder), "--workers", str(args.workers))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((folder / "sweep.json").read_text())
    print(f"{method}: {result['trials_finished']} trials in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def summarise(result: dict, shared_points: int) -> dict:
    trials = result["trials"]
    shared = [t for t in trials if t["setting"] < shared_points]
    selected = [t["student_selected_acc"] for t in trials if t.get("student_selected_acc") is not None]
    return {
        "all": describe([t["student_acc"] for t in trials]),
        "shared": describe([t["student_acc"] for t in shared]),
        "selected": describe(selected),
        "oracle": describe([t["student_best_on_test_acc"] for t in trials]),
        # Per-setting means (seeds averaged) separate sensitivity to the setting from seed noise.
        "setting_means": {
            "shared": describe([st["mean"] for st in result["settings"][:shared_points] if st["mean"] is not None]),
            "all": describe([st["mean"] for st in result["settings"] if st["mean"] is not None]),
        },
        "worst_setting": min(result["settings"], key=lambda s: s["mean"] if s["mean"] is not None else 2.0),
        "values": [t["student_acc"] for t in trials],
        "failed": result["failed"],
    }


def verdict(table: dict) -> str:
    """Plainly: is RDSKD steadier than DAFL on the shared grid (smaller spread and higher minimum)?"""
    if "rdskd" not in table or "dafl" not in table:
        return "RDSKD or DAFL was not run, so the claim is not tested here."
    r, d = table["rdskd"]["shared"], table["dafl"]["shared"]
    if r["n"] < 2 or d["n"] < 2:
        return "Too few finished trials to compare spreads."
    steadier = r["std"] < d["std"] and r["min"] > d["min"]
    how = (
        f"RDSKD std {100 * r['std']:.1f} vs DAFL {100 * d['std']:.1f} points, minimum {100 * r['min']:.1f}% vs "
        f"{100 * d['min']:.1f}%, mean {100 * r['mean']:.1f}% vs {100 * d['mean']:.1f}%"
    )
    if steadier:
        return f"Yes: on the shared grid RDSKD is more robust than DAFL here ({how})."
    return f"No: on the shared grid RDSKD is not more robust than DAFL here on both counts ({how})."


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def markdown(data: dict, analysis: str | None) -> str:
    b = data["bench"]
    lines = [
        f"# B3: robustness over hyperparameters, {b['name']}",
        "",
        f"`{data['command']}`, {data['date']}, {machine_line(data['machine'], data['machine']['precision'])}; "
        f"{b['workers']} trials side by side, one core each; each trial {b['budget']:g} s of training with "
        f"the method's cpu preset; seeds {b['seeds']}.",
        "",
        "Final student test accuracy (%). *Shared grid*: the settings every method has (like for like); "
        "*all*: plus the method's own loss weights, one at a time. Label-free selected: the student "
        "chosen by agreement with the teacher on held-out synthetic images; best on test is an oracle.",
        "",
        "| method | trials | shared: mean | std | min | max | all: mean | std | min | max | label-free "
        "selected: mean | best on test (oracle): mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, t in data["table"].items():
        s, a = t["shared"], t["all"]
        lines.append(
            f"| {method} | {a['n']} | {pct(s['mean'])} | {pct(s['std'])} | {pct(s['min'])} | "
            f"{pct(s['max'])} | {pct(a['mean'])} | {pct(a['std'])} | {pct(a['min'])} | {pct(a['max'])} | "
            f"{pct(t['selected']['mean'])} | {pct(t['oracle']['mean'])} |"
        )
    lines += [
        "",
        f"**Is RDSKD more robust than DAFL?** {data['verdict']}",
        "",
        "The std above mixes two things: how much a method depends on its setting, and seed noise. "
        "Averaging the seeds of each setting first leaves the first (range = max - min of the "
        "per-setting means):",
        "",
        "| method | settings (shared) | shared: lowest | highest | range | settings (all) | all: lowest | "
        "highest | range |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, t in data["table"].items():
        sm, am = t["setting_means"]["shared"], t["setting_means"]["all"]
        spread = [
            (d["n"], pct(d["min"]), pct(d["max"]), pct(d["max"] - d["min"] if d["n"] else None)) for d in (sm, am)
        ]
        lines.append(f"| {method} | " + " | ".join(str(v) for part in spread for v in part) + " |")
    lines += ["", "Worst setting of each method (mean over seeds):", ""]
    for method, t in data["table"].items():
        w = t["worst_setting"]
        lines.append(f"- {method}: {pct(w['mean'])}% with {' '.join(w['overrides']) or 'its preset'}")
    for method, t in data["table"].items():
        for key, error in t["failed"].items():
            lines.append(f"- failed: {method} {key}: {error}")
    lines += [
        "",
        f"![box plot]({data['plot']})",
        "",
        f"The sweeps' own tables (per setting) are in `{b['work']}/METHOD/sweep.md`.",
        "",
        *analysis_section(analysis),
    ]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    methods = list(data["table"])
    ax.boxplot([data["table"][m]["values"] for m in methods], showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), methods)
    ax.set_ylabel("final student accuracy"), ax.set_title(f"B3 {data['bench']['name']}: every setting x seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    data_name, arch, epochs, _, has_bn = BENCHES[args.bench]
    teacher = finished(args.work / "teacher") or api.train_teacher(
        arch, data_name, epochs, out=args.work / "teacher", resume=True
    )
    teacher_file = str(args.work / "teacher" / "model.safetensors")
    table, sweeps = {}, {}
    for method in args.methods:
        sweeps[method] = run_sweep(args, method, teacher_file)
        shared = 1
        for values in shared_grid(method, args.small_grid, has_bn).values():
            shared *= len(values)
        table[method] = summarise(sweeps[method], shared)
    name = f"robustness_{args.bench}"
    data = {
        "command": command_line(),
        "date": today(),
        "machine": {
            **machine(),
            "precision": precisions(
                t_dir for m in args.methods for t_dir in (args.work / m / "trials").glob("s*-seed*") if t_dir.is_dir()
            ),
        },
        "bench": {
            "name": args.bench,
            "budget": args.budget,
            "seeds": args.seeds,
            "workers": args.workers,
            "small_grid": args.small_grid,
            "work": str(args.work),
        },
        "teacher_acc": teacher["teacher_acc"],
        "table": table,
        "verdict": verdict(table),
        "plot": f"{name}.png",
        "sweeps": sweeps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(data, args.out / f"{name}.png")
    report = markdown(data, args.analysis)
    write(args.out, name, data, report)
    print(report)


if __name__ == "__main__":
    main()
