"""What separates a finished pool-based run's synthetic images from the real test images, and where its student
fails on the real ones: a diagnosis to run before trying a prior or an augmentation, so that the change aims at
a difference that is there.

Pixel statistics, pool against real (the teacher's normalised units; the real images normalised as the teacher
was trained): total variation per 128 images (dfkt.losses.total_variation, DeepInversion's smoothness prior),
the share of pixels at black (the floor of the input range), the mean of the 2-pixel border, the sd of the
per-image means (how much images differ in overall brightness). Then, on the real test images: the student's
and the teacher's accuracy per brightness quartile and with every pixel's intensity scaled (×0.6 … ×1.25,
clipped at white), the student's accuracy per class and its largest confusions.

    python benchmarks/pool_vs_real.py runs/b2-compare17/rdskd/seed1 runs/b2-compare17/rdskd/seed2 --data fmnist

The student is the run's written one (student.safetensors: with a weight average, the average), the teacher the
model file the run names (a `module:function` teacher is not read here). Single-channel data is what it was written
for: "black" is the lowest channel's floor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dfkt import losses
from dfkt.config import EngineConfig
from dfkt.data import load_dataset
from dfkt.engine import Engine
from dfkt.models.files import load_model
from dfkt.supervised import predict_classes

INTENSITIES = (0.6, 0.8, 1.0, 1.25)


def pixel_statistics(images: torch.Tensor, black: float) -> dict:
    if len(images) < 128:
        raise SystemExit(f"pixel statistics need at least 128 images, got {len(images)}")
    chunks = [images[i : i + 128] for i in range(0, len(images) - 127, 128)]
    border = torch.zeros(images.shape[-2:], dtype=torch.bool)
    border[:2, :] = border[-2:, :] = border[:, :2] = border[:, -2:] = True
    return {
        "tv_per_128": torch.stack([losses.total_variation(c) for c in chunks]).mean().item(),
        "share_at_black": (images < black + 0.01).float().mean().item(),
        "border_mean": images[..., border].mean().item(),
        "sd_of_image_means": images.flatten(1).mean(1).std().item(),
    }


def diagnose(run: Path, data: str, images: int) -> dict:
    if not all((run / f).is_file() for f in ("summary.json", "checkpoint.pt", "student.safetensors")):
        raise SystemExit(f"{run}: not a finished distill run (needs summary.json, checkpoint.pt, student.safetensors)")
    summary = json.loads((run / "summary.json").read_text())
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]
    if "pool.images" not in state["buffers"]:
        raise SystemExit(f"{run}: no pool in its checkpoint (a method or preset that keeps one: rdskd --preset cpu)")
    teacher, info = load_model(summary["teacher"])
    student, _ = load_model(run / "student.safetensors")
    teacher.eval(), student.eval()
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    real = load_dataset(data, None, False, info.image_size)
    pixels = real.test_images.float() / 255
    labels = real.test_labels
    black = (-mean / std).min().item()
    pool = state["buffers"]["pool.images"][:images].float()
    out = {
        "run": str(run),
        "student_acc": summary["student_acc"],
        "pool": pixel_statistics(pool, black),
        "real": pixel_statistics(((pixels[:images] - mean) / std), black),
    }
    engine = Engine(EngineConfig(precision="32-true", threads=1, progress=False))
    brightness = pixels.flatten(1).mean(1)
    quartile = torch.bucketize(brightness, torch.quantile(brightness, torch.tensor([0.25, 0.5, 0.75])))
    said = {}  # each net's classes at each intensity, every prediction made once
    for name, net in (("student", student), ("teacher", teacher)):
        said[name] = {c: predict_classes(net, ((pixels * c).clamp(0, 1) - mean) / std, engine) for c in INTENSITIES}
        hit = said[name][1.0] == labels
        out[name] = {
            "by_brightness_quartile": [hit[quartile == q].float().mean().item() for q in range(4)],
            "by_intensity": {str(c): (said[name][c] == labels).float().mean().item() for c in INTENSITIES},
        }
    n = info.num_classes
    confusion = torch.bincount(labels * n + said["student"][1.0], minlength=n * n).reshape(n, n)
    out["student_per_class"] = (confusion.diag().float() / confusion.sum(1).clamp_min(1)).tolist()
    top = confusion.fill_diagonal_(0).flatten().topk(5)
    out["student_confusions"] = [(int(i) // n, int(i) % n, int(k)) for k, i in zip(top.values, top.indices)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    parser.add_argument("--data", default="fmnist", help="the real data the teacher was trained on (its test split)")
    parser.add_argument("--images", type=int, default=2048, help="pool and real images for the pixel statistics")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [diagnose(run, args.data, args.images) for run in args.runs]
    print("| images | TV per 128 | share at black | border mean | sd of image means |\n|---|---|---|---|---|")
    for r in rows:
        for kind in ("pool", "real"):
            s = r[kind]
            print(
                f"| {kind} of {r['run']} | {s['tv_per_128']:.0f} | {s['share_at_black']:.3f} | "
                f"{s['border_mean']:.2f} | {s['sd_of_image_means']:.3f} |"
            )
    print(
        "\n| run | net | test acc | by brightness quartile, dark to bright | intensity "
        + " / ".join(f"×{c}" for c in INTENSITIES)
        + " |\n|---|---|---|---|---|"
    )
    for r in rows:
        for net in ("student", "teacher"):
            q = " / ".join(f"{100 * a:.1f}" for a in r[net]["by_brightness_quartile"])
            c = " / ".join(f"{100 * a:.1f}" for a in r[net]["by_intensity"].values())
            print(f"| {r['run']} | {net} | {100 * r[net]['by_intensity']['1.0']:.1f} | {q} | {c} |")
    print("\n| run | student per class (%) | largest confusions (true→said: count) |\n|---|---|---|")
    for r in rows:
        classes = " / ".join(f"{100 * a:.0f}" for a in r["student_per_class"])
        confusions = ", ".join(f"{t}→{s}: {n}" for t, s, n in r["student_confusions"])
        print(f"| {r['run']} | {classes} | {confusions} |")


if __name__ == "__main__":
    main()
