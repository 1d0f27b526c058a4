"""Screen a student-side change on the pool of a finished pool-based run (RDSKD ``cpu``): a fresh student trained
on the run's stored pool (images and teacher logits from its checkpoint) for a fixed number of steps, with the
preset's student recipe (Adam, batches of 64, KD at τ 10, shift + flip relabelled by the teacher, started from the
teacher's leading slice) unless told otherwise. Every variant of one pool sees the same pool, so differences are
the change's and not the generator's; a screen, not a figure: what passes it is run through ``ablation.py``.

    python benchmarks/pool_student.py runs/b2-25/preset/seed1 --steps 30000 --anchor 0.01 --out runs/screen

Variants: ``--init`` (leading: the library's slice; l1: each layer's output channels of largest L1 filter norm;
l1-out: of largest L1 norm of their outgoing weights; the next layer's inputs sliced alike, for a chain of
convolutions and linear layers; random), ``--anchor W`` (L2-SP, Li et al. 2018: + W · Σ‖θ − θ₀‖² over the student's
weights, θ₀ its start), ``--freeze K`` (the first K convolutions kept at their start), ``--temperature``, ``--lr``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from dfkt import losses
from dfkt.data import load_dataset
from dfkt.data.augment import augment_batch
from dfkt.models import build_model
from dfkt.models.files import load_model
from dfkt.models.slicing import init_from_teacher

# The screen's names for the library's rankings (dfkt.models.slicing.ranked_teacher), as its recorded commands use them.
RANKINGS = {"l1": "filter_norm", "l1-out": "outgoing_norm"}


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(images[i : i + 2000]).argmax(1) for i in range(0, len(images), 2000)])
    model.train()
    per_class = [(predicted[labels == k] == k).float().mean().item() for k in range(int(labels.max()) + 1)]
    return (predicted == labels).float().mean().item(), per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run whose checkpoint holds a pool")
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--init", choices=["leading", "l1", "l1-out", "random"], default="leading")
    parser.add_argument("--anchor", type=float, default=0.0)
    parser.add_argument("--freeze", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="fmnist")
    parser.add_argument("--name", default=None, help="the variant's name in the output (default: from its settings)")
    parser.add_argument("--out", type=Path, default=None, help="append the result as a JSON line to OUT/screen.jsonl")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    summary = json.loads((args.run / "summary.json").read_text())
    state = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]
    pool = state["buffers"]["pool.images"].float()  # the teacher labels every augmented batch, as the preset does
    teacher, info = load_model(summary["teacher"])
    teacher.eval().requires_grad_(False)
    student = build_model(summary["student"], info.num_classes, info.in_channels, info.image_size)
    if args.init == "leading":
        init_from_teacher(student, teacher)
    elif args.init in RANKINGS:
        example = torch.randn(8, info.in_channels, info.image_size, info.image_size)
        init_from_teacher(student, teacher, RANKINGS[args.init], example)
    start = [p.detach().clone() for p in student.parameters()]
    for layer in [m for m in student.modules() if isinstance(m, nn.Conv2d)][: args.freeze]:
        layer.requires_grad_(False)

    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    black, white = -mean / std, (1 - mean) / std
    real = load_dataset(args.data, None, False, info.image_size)
    test_images = (real.test_images.float() / 255 - mean) / std
    test_labels = real.test_labels

    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    rng = torch.Generator().manual_seed(args.seed)
    curve = [(0, *evaluate(student, test_images, test_labels))]
    began = time.time()
    student.train()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(pool), (args.batch,), generator=rng)
        images = augment_batch(pool[index], ["shift", "flip"], rng, black, high=white)
        with torch.no_grad():
            target = teacher(images)
        loss = losses.kd_loss(student(images), target, args.temperature)
        if args.anchor:
            loss = loss + args.anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(student.parameters(), start))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            curve.append((step, *evaluate(student, test_images, test_labels)))
    name = args.name or f"init={args.init} anchor={args.anchor} freeze={args.freeze} T={args.temperature} lr={args.lr}"
    last = [acc for _, acc, _ in curve[-5:]]
    result = {
        "run": str(args.run),
        "variant": name,
        "seed": args.seed,
        "start_acc": curve[0][1],
        "final_acc": curve[-1][1],
        "last5_mean": sum(last) / len(last),
        "final_per_class": [round(a, 3) for a in curve[-1][2]],
        "curve": [(s, round(a, 4)) for s, a, _ in curve],
        "seconds": round(time.time() - began, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "screen.jsonl", "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
