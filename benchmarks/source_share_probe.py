"""Post-hoc probe of `params.source_share=agreement` and `params.reestimate_batchnorm` on finished
`dfkt adapt` runs (e.g. those of benchmarks/sfda_compare.py, made without them): for each run's label-free
choice (model_selected.safetensors), the inductive accuracy (held-out half) of

    source      the source model;            source_bn  the source, BatchNorm statistics recomputed
    as_adapted  the weights as adapted;      as_adapted_bn  the same, statistics recomputed
    agreement   interpolated with the source at s = r² (dfkt.sfda.interpolation.agreement_share);
    agreement_bn  the same, statistics recomputed on the adapted half with dropout off

    python benchmarks/source_share_probe.py --work runs/b4-mixval --out benchmarks/results/NAME.json \\
        --targets impulse_noise motion_blur scale

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
from dfkt.sfda.interpolation import agreement_share, interpolate_with_source, reestimate_batchnorm

COLUMNS = ("source", "source_bn", "as_adapted", "as_adapted_bn", "agreement", "agreement_bn")


@torch.no_grad()
def classes(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([net(images[i : i + 1000]) for i in range(0, len(images), 1000)]).argmax(1)


def probe(source: torch.nn.Module, adapted: torch.nn.Module, adapted_half: torch.Tensor, held_out: tuple) -> dict:
    row = {}
    share = agreement_share(classes(source, adapted_half), classes(adapted, adapted_half))
    for name, s in (("source", 1.0), ("as_adapted", 0.0), ("agreement", share)):
        net = interpolate_with_source(source, adapted, s)
        row[name] = float((classes(net, held_out[0]) == held_out[1]).float().mean())
        reestimate_batchnorm(net, adapted_half)
        row[f"{name}_bn"] = float((classes(net, held_out[0]) == held_out[1]).float().mean())
    return {**row, "share": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a folder with adapt/**/seedS runs")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every run's figures (kept ones reused)")
    parser.add_argument("--targets", nargs="*", default=[], help="only targets whose name holds one of these")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {row["run"] for row in rows}
    for summary_file in sorted(args.work.glob("adapt/**/seed*/summary.json")):
        run, summary = summary_file.parent, json.loads(summary_file.read_text())
        wanted = not args.targets or any(t in summary["target"] for t in args.targets)
        if str(run) in done or not wanted or not (run / "model_selected.safetensors").is_file():
            continue
        source_file = Path(summary["source"])
        (adapted_half, _), held_out = run_halves(str(source_file), summary["target"])
        source, adapted = load_model(source_file)[0], load_model(run / "model_selected.safetensors")[0]
        row = {"run": str(run), "target": summary["target"], "method": summary["method"]}
        rows.append({**row, **probe(source, adapted, adapted_half, held_out)})
        args.out.write_text(json.dumps(rows, indent=1))
        print(run, {c: round(100 * rows[-1][c], 1) for c in COLUMNS}, flush=True)
    groups = collections.defaultdict(list)
    for row in rows:
        if not args.targets or any(t in row["target"] for t in args.targets):
            groups[(row["target"], row["method"])].append(row)
    print("| target | method | seeds | " + " | ".join(COLUMNS) + " | share |")
    print("|---" * (4 + len(COLUMNS)) + "|")
    means = collections.defaultdict(list)
    for (target, method), group in sorted(groups.items()):
        cells = {c: statistics.mean(r[c] for r in group) for c in (*COLUMNS, "share")}
        for c in COLUMNS:
            means[c].append(cells[c])
        shown = " | ".join(f"{100 * cells[c]:.1f}" for c in COLUMNS)
        print(f"| {target} | {method} | {len(group)} | {shown} | {cells['share']:.2f} |")
    print("| mean of the rows | | | " + " | ".join(f"{100 * statistics.mean(means[c]):.2f}" for c in COLUMNS) + " | |")


if __name__ == "__main__":
    main()
