"""Which label-free score picks an adapted model's epoch best? MixVal (the one `dfkt adapt` uses by
default) and information maximisation against soft neighbourhood density and mean entropy, on one run.

    python benchmarks/label_free_scores.py --method shot --source SOURCE.safetensors --target digits --out DIR

Runs `dfkt.adapt` in this process with every evaluation (one per epoch) also scored by:
- mixval: inter-cluster MixVal, dfkt.selection.mixval_score (higher is better);
- im: information maximisation, dfkt.selection.information_maximization_score (higher is better);
- snd: soft neighbourhood density (Saito et al., ICCV 2021): the mean entropy of
  softmax(cos(p_i, p_j) / 0.05 over j != i) on the softmax outputs (higher is better);
- neg_entropy: minus the mean prediction entropy / ln K (higher is better);
and the source model too. Prints each epoch's transductive accuracy beside the scores,
which epoch each score would keep, and whether it would call the final model worse than the source;
writes DIR.json. Exploratory, one run at a time: no seeds loop, no table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import dfkt
from dfkt import selection


def snd(probs: torch.Tensor, temperature: float = 0.05) -> float:
    f = F.normalize(probs.double(), dim=1)
    similarity = f @ f.t()
    similarity.fill_diagonal_(-float("inf"))
    q = F.softmax(similarity / temperature, dim=1)
    return float(-(q * torch.log(q.clamp_min(1e-300))).sum(dim=1).mean())


def scores(predict, images: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1).mean() / math.log(probs.shape[1])
    return {
        "mixval": selection.mixval_score(predict, images, probs),
        "im": selection.information_maximization_score(probs),
        "snd": snd(probs),
        "neg_entropy": -float(entropy),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    seen: list[dict[str, float]] = []
    original = selection.TargetScoreSelection.score

    @torch.no_grad()
    def score(self, net):  # every model the run scores: the source first, then one per evaluation
        with self.engine.eval_mode(net), torch.autocast(self.engine.device.type, enabled=False):

            def predict(images: torch.Tensor) -> torch.Tensor:
                return net(images.float()).float()

            probs = [F.softmax(predict(self.images[i : i + 1000]), dim=1) for i in range(0, len(self.images), 1000)]
            seen.append(scores(predict, self.images, torch.cat(probs)))
        return original(self, net)

    selection.TargetScoreSelection.score = score
    summary = dfkt.adapt(args.method, args.source, args.target, overrides=args.overrides, out=args.out)
    source, epochs = seen[0], seen[1 : 1 + len(summary["curve"])]
    accuracy = [e["adapted_acc"] for e in summary["curve"]]
    print(
        f"source: transductive {summary['source_only']['transductive']:.3f}, "
        + ", ".join(f"{k} {v:.3f}" for k, v in source.items())
    )
    for e, s in zip(summary["curve"], epochs):
        print(
            f"epoch {e['epoch']:g}: transductive {e['adapted_acc']:.3f}, "
            + ", ".join(f"{k} {v:.3f}" for k, v in s.items())
        )
    best = max(accuracy)
    for name in source:
        pick = max(range(len(epochs)), key=lambda i: epochs[i][name])  # ties: the first, as dfkt adapt
        print(
            f"{name}: keeps epoch {summary['curve'][pick]['epoch']:g} ({accuracy[pick]:.3f}; best {best:.3f}, "
            f"within 1 point: {accuracy[pick] >= best - 0.01}); calls the final model "
            f"{'worse' if epochs[-1][name] < source[name] else 'not worse'} than the source "
            f"(truth: {'worse' if accuracy[-1] < summary['source_only']['transductive'] else 'not worse'})"
        )
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "source": source,
                "source_acc": summary["source_only"]["transductive"],
                "curve": [{**e, **s} for e, s in zip(summary["curve"], epochs)],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
