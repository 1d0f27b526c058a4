"""Post-hoc probe: each finished `dfkt adapt` run's weights interpolated with its source model's,

    w(α) = α · w_adapted + (1 − α) · w_source,   α ∈ {0, 0.25, 0.5, 0.75, 1}

(every floating-point tensor, BatchNorm running statistics included; the weight-space ensembles of WiSE-FT,
Wortsman et al., CVPR 2022), scored on the run's two target halves (inductive: held out; transductive: adapted)
and by MixVal on the adapted half, without labels. For the final weights (model.safetensors) and the label-free
choice (model_selected.safetensors) of every run under WORK/adapt, e.g. those of benchmarks/sfda_compare.py.

    python benchmarks/interpolation_probe.py --work runs/b4-mixval --out benchmarks/results/NAME.json

Prints, per target and method, the mean inductive accuracy at each α and at the α MixVal picks.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from dfkt.api.adapt import target_halves, target_images
from dfkt.api.common import normalized
from dfkt.config import DataConfig
from dfkt.models.files import load_model, read_info
from dfkt.selection import mixval_score

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHUNK = 1000


@torch.no_grad()
def scores(net: torch.nn.Module, adapted: tuple, held_out: tuple) -> dict[str, float]:
    def predict(x):
        return torch.cat([net(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)])

    logits = predict(adapted[0])
    return {
        "inductive": float((predict(held_out[0]).argmax(1) == held_out[1]).float().mean()),
        "transductive": float((logits.argmax(1) == adapted[1]).float().mean()),
        "mixval": mixval_score(net, adapted[0], F.softmax(logits, 1)),
    }


@functools.cache
def run_halves(source: str, target: str) -> tuple[tuple, tuple]:
    """The target images of runs from ``source`` on ``target``, normalised for the source model, as
    (images, labels) of the adapted half and of the held-out half (`dfkt adapt`'s default split)."""
    info = read_info(Path(source))
    images = target_images(DataConfig(name=target), info)
    normal, (first, second) = normalized(images.images, info), target_halves(len(images.images), 0)
    return (normal[first], images.labels[first]), (normal[second], images.labels[second])


def interpolated(source: torch.nn.Module, adapted: torch.nn.Module, alpha: float) -> torch.nn.Module:
    net, ws, wa = copy.deepcopy(source), source.state_dict(), adapted.state_dict()
    net.load_state_dict({k: alpha * wa[k] + (1 - alpha) * ws[k] if ws[k].is_floating_point() else wa[k] for k in ws})
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a folder with adapt/**/seedS runs")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for every run's figures (kept ones reused)")
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["model.safetensors", "model_selected.safetensors"],
        help="which of each run's weights to interpolate",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    rows = [{**row, "by_alpha": {float(a): v for a, v in row["by_alpha"].items()}} for row in rows]  # JSON keys
    done = {(row["run"], row["weights"]) for row in rows}
    for summary_file in sorted(args.work.glob("adapt/**/seed*/summary.json")):
        run, summary = summary_file.parent, json.loads(summary_file.read_text())
        if not (run / "model_selected.safetensors").is_file():
            continue
        if all((str(run), which) in done for which in args.weights):
            continue
        source_file = Path(summary["source"])
        halves = run_halves(str(source_file), summary["target"])
        source = load_model(source_file)[0].eval()
        for which in args.weights:
            if (str(run), which) in done:
                continue
            adapted = load_model(run / which)[0].eval()
            by_alpha = {a: scores(interpolated(source, adapted, a), *halves) for a in ALPHAS}
            rows.append(
                {
                    "run": str(run),
                    "target": summary["target"],
                    "method": summary["method"],
                    "weights": which,
                    "by_alpha": by_alpha,
                }
            )
            args.out.write_text(json.dumps(rows, indent=1))
            print(run, which, {a: round(100 * v["inductive"], 1) for a, v in by_alpha.items()}, flush=True)
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in rows:
        if row["weights"] not in args.weights:
            continue
        by_alpha = row["by_alpha"]
        picked = max(ALPHAS, key=lambda a: by_alpha[a]["mixval"])
        group = groups[(row["target"], row["method"], row["weights"])]
        for a in ALPHAS:
            group[a].append(by_alpha[a]["inductive"])
        group["MixVal's α"].append(by_alpha[picked]["inductive"])
    print("| target | method | weights | " + " | ".join(f"α {a}" for a in ALPHAS) + " | MixVal's α |")
    print("|---" * (4 + len(ALPHAS)) + "|")
    for (target, method, weights), group in sorted(groups.items()):
        cells = [f"{100 * statistics.mean(v):.1f}" for v in group.values()]
        print(f"| {target} | {method} | {weights.split('.')[0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
