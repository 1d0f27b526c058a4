"""How well a finished pool-based run's student fits its own training data: the share of pool images on
which the student's top class is the teacher's (from the teacher logits stored with the pool), and the
teacher's mean confidence on them. A student far below 100% here underfits its synthetic data.

    python benchmarks/pool_fit.py runs/abl-r1/preset/seed1 runs/abl-r1/preset/seed2 --images 4000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dfkt.models import build_model
from dfkt.models.files import load_model


def pool_fit(run: Path, images: int) -> dict:
    if not (run / "summary.json").is_file() or not (run / "checkpoint.pt").is_file():
        raise SystemExit(f"{run}: not a finished distill run (needs summary.json and checkpoint.pt)")
    summary = json.loads((run / "summary.json").read_text())
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]
    if "pool.images" not in state["buffers"]:
        raise SystemExit(f"{run}: no pool in its checkpoint (a method or preset that keeps one: rdskd --preset cpu)")
    _, info = load_model(summary["teacher"])
    student = build_model(summary["student"], info.num_classes, info.in_channels, info.image_size)
    student.load_state_dict(state["modules"]["student"])
    pool, logits = state["buffers"]["pool.images"][:images], state["buffers"]["pool.logits"][:images]
    with torch.no_grad():
        agreement = (student.eval()(pool).argmax(1) == logits.argmax(1)).float().mean().item()
    return {
        "run": str(run),
        "student_acc": summary["student_acc"],
        "pool_agreement": agreement,
        "teacher_confidence": torch.softmax(logits, 1).max(1).values.mean().item(),
        "images": len(pool),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    parser.add_argument("--images", type=int, default=4000, help="pool images checked (the first N)")
    args = parser.parse_args()
    rows = [pool_fit(run, args.images) for run in args.runs]
    print("| run | test accuracy | agreement on its pool | teacher confidence |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {100 * r['student_acc']:.1f} | {100 * r['pool_agreement']:.1f} | "
            f"{r['teacher_confidence']:.2f} |"
        )


if __name__ == "__main__":
    main()
