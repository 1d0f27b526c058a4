"""Post-hoc probe of `params.source_share=agreement` and `params.reestimate_batchnorm` on finished
`dfkt adapt` runs (e.g. those of benchmarks/sfda_compare.py, made without them): for each run's label-free
choice (model_selected.safetensors), the inductive accuracy (held-out half) of

    source      the source model;            source_bn  the source, BatchNorm statistics recomputed
    as_adapted  the weights as adapted;      as_adapted_bn  the same, statistics recomputed
    agreement   interpolated with the source at s = r² (dfkt.sfda.interpolation.agreement_share);
    agreement_bn  the same, statistics recomputed on the adapted half with dropout off
    agreement_ramp_bn  the same at s = clip((r − 0.3)/0.5, 0, 1) (params.source_share=agreement_ramp)

    python benchmarks/source_share_probe.py --work runs/b4-mixval --out benchmarks/results/NAME.json \\
        --targets impulse_noise motion_blur scale

With --grid S [S ...] each row also holds ``grid``: the inductive accuracy at each fixed share s, statistics
recomputed (as `params.reestimate_batchnorm=true` does), and ``agreement_rate`` r, so that rules s = f(r)
other than r² can be compared afterwards without adapting again (--rules prints them). --weights picks the
run's final weights (model.safetensors) instead of its label-free choice. ``agreement_rate_source_bn`` is r against
the source with its statistics refit, kept as a candidate second signal for a rule.

Finished rows in OUT are kept. Prints the mean per target and method, and over all rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

import torch
from interpolation_probe import run_halves  # benchmarks/, beside this script

from dfkt.models.files import load_model
from dfkt.sfda.interpolation import (
    agreement_rate,
    interpolate_with_source,
    ramp,
    reestimate_batchnorm,
)

COLUMNS = ("source", "source_bn", "as_adapted", "as_adapted_bn", "agreement", "agreement_bn", "agreement_ramp_bn")


@torch.no_grad()
def classes(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([net(images[i : i + 1000]) for i in range(0, len(images), 1000)]).argmax(1)


def accuracy(net: torch.nn.Module, held_out: tuple) -> float:
    return float((classes(net, held_out[0]) == held_out[1]).float().mean())


def probe(
    source: torch.nn.Module, adapted: torch.nn.Module, adapted_half: torch.Tensor, held_out: tuple, grid=()
) -> dict:
    row = {}
    adapted_classes = classes(adapted, adapted_half)
    rate = agreement_rate(classes(source, adapted_half), adapted_classes)
    share = rate**2  # the preset's rule, params.source_share=agreement
    for name, s in (("source", 1.0), ("as_adapted", 0.0), ("agreement", share)):
        net = interpolate_with_source(source, adapted, s)
        row[name] = accuracy(net, held_out)
        reestimate_batchnorm(net, adapted_half)
        row[f"{name}_bn"] = accuracy(net, held_out)
        if name == "source":  # agreement with the source as BatchNorm-refit, a candidate signal for a rule
            row["agreement_rate_source_bn"] = float((classes(net, adapted_half) == adapted_classes).float().mean())
    net = interpolate_with_source(source, adapted, ramp(rate))
    reestimate_batchnorm(net, adapted_half)
    row["agreement_ramp_bn"] = accuracy(net, held_out)
    if grid:
        row["grid"] = {}
        for s in grid:
            net = interpolate_with_source(source, adapted, s)
            reestimate_batchnorm(net, adapted_half)
            row["grid"][str(s)] = accuracy(net, held_out)
    return {**row, "share": share, "agreement_rate": rate}


# Candidate rules s = f(r), r the agreement rate, compared with --rules on the grid (linear between its points).
RULES = {
    "r^2 (agreement)": lambda r: r**2,
    "r": lambda r: r,
    "(r-0.4)/0.4": lambda r: min(1.0, max(0.0, (r - 0.4) / 0.4)),
    "agreement_ramp": ramp,
    "1 (source, refit)": lambda r: 1.0,
}


def on_grid(grid: dict[str, float], s: float) -> float:
    points = sorted((float(k), v) for k, v in grid.items())
    for (s0, a0), (s1, a1) in zip(points, points[1:]):
        if s0 <= s <= s1:
            return a0 + (a1 - a0) * (s - s0) / (s1 - s0)
    return points[0][1] if s < points[0][0] else points[-1][1]


def task(row: dict) -> str:
    """The run's task folder (B4: CORRUPTION-SEVERITY-SCALE; B5: MODEL-SOURCE-TARGET), so that B5's two source
    models on one target are not pooled."""
    return Path(row["run"]).parent.parent.name


def print_rules(rows: list[dict]) -> None:
    """Per task and method, the mean inductive accuracy each rule would give and that of each run's best grid
    share (an oracle: it needs the labels), from the rows' grids."""
    groups = collections.defaultdict(list)
    for row in rows:
        if "grid" in row:
            groups[(task(row), row["method"])].append(row)
    names = list(RULES)
    print("| target | method | r | " + " | ".join(names) + " | best s per run (oracle) | source_bn |")
    print("|---" * (5 + len(names)) + "|")
    totals = collections.defaultdict(list)
    for (target, method), group in sorted(groups.items()):
        cells = {
            name: statistics.mean(on_grid(r["grid"], rule(r["agreement_rate"])) for r in group)
            for name, rule in RULES.items()
        }
        cells["oracle"] = statistics.mean(max(r["grid"].values()) for r in group)
        cells["source_bn"] = statistics.mean(r["source_bn"] for r in group)
        for n, v in cells.items():
            totals[n].append(v)
        rate = statistics.mean(r["agreement_rate"] for r in group)
        shown = " | ".join(f"{100 * cells[n]:.1f}" for n in (*names, "oracle", "source_bn"))
        print(f"| {target} | {method} | {rate:.2f} | {shown} |")
    shown = " | ".join(f"{100 * statistics.mean(totals[n]):.2f}" for n in (*names, "oracle", "source_bn"))
    print(f"| mean of the rows | | | {shown} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a folder with adapt/**/seedS runs")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every run's figures (kept ones reused)")
    parser.add_argument("--targets", nargs="*", default=[], help="only targets whose name holds one of these")
    parser.add_argument("--grid", nargs="*", type=float, default=[], help="fixed shares s to score (BatchNorm refit)")
    parser.add_argument(
        "--weights", default="model_selected.safetensors", help="which weights of each run (or model.safetensors)"
    )
    parser.add_argument("--rules", action="store_true", help="print the rules s = f(r) of RULES on the grids")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {row["run"] for row in rows}
    for summary_file in sorted(args.work.glob("adapt/**/seed*/summary.json")):
        run, summary = summary_file.parent, json.loads(summary_file.read_text())
        wanted = not args.targets or any(t in summary["target"] for t in args.targets)
        if str(run) in done or not wanted or not (run / args.weights).is_file():
            continue
        source_file = Path(summary["source"])
        (adapted_half, _), held_out = run_halves(str(source_file), summary["target"])
        source, adapted = load_model(source_file)[0], load_model(run / args.weights)[0]
        row = {"run": str(run), "target": summary["target"], "method": summary["method"]}
        rows.append({**row, "weights": args.weights, **probe(source, adapted, adapted_half, held_out, args.grid)})
        args.out.write_text(json.dumps(rows, indent=1))
        print(run, {c: round(100 * rows[-1][c], 1) for c in COLUMNS}, flush=True)
    groups = collections.defaultdict(list)
    for row in rows:
        if not args.targets or any(t in row["target"] for t in args.targets):
            groups[(task(row), row["method"])].append(row)
    print("| target | method | seeds | " + " | ".join(COLUMNS) + " | share |")
    print("|---" * (4 + len(COLUMNS)) + "|")
    means = collections.defaultdict(list)
    for (target, method), group in sorted(groups.items()):
        cells = {c: statistics.mean(r.get(c, float("nan")) for r in group) for c in (*COLUMNS, "share")}
        for c in COLUMNS:
            means[c].append(cells[c])
        shown = " | ".join(f"{100 * cells[c]:.1f}" for c in COLUMNS)
        print(f"| {target} | {method} | {len(group)} | {shown} | {cells['share']:.2f} |")
    print("| mean of the rows | | | " + " | ".join(f"{100 * statistics.mean(means[c]):.2f}" for c in COLUMNS) + " | |")
    if args.rules:
        print_rules([row for group in groups.values() for row in group])


if __name__ == "__main__":
    main()
