"""What a finished generator run's frozen generator draws, in pixels and in the teacher's classes, beside the
real test images: a diagnosis of samples the teacher's classes cannot be learnt from.

For each RUN (a `dfkt distill` folder of a one-generator DAFL-architecture method, e.g. RDSKD, with its
checkpoint.pt), it draws N samples from the generator of the checkpoint, in eval mode (as RDSKD draws its pool)
and in train mode, and prints the teacher's class histogram in each mode, the samples' brightest pixel as a share
of white, and the shares of pixels at black and above BRIGHT of white, for the samples and for N real test images.

    python benchmarks/generator_pixels.py runs/wrn18/preset/seed1 runs/b2-compare17/rdskd/seed1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from torch import Tensor

from dfkt.data import load_dataset
from dfkt.data.base import denormalize
from dfkt.models.files import load_model, read_info
from dfkt.models.generator import DAFLGenerator

BRIGHT = 0.62  # a bright pixel, as a share of white: about the brightest of the WRN-16-2 teacher's RDSKD samples


def pixel_figures(pixels: Tensor) -> dict[str, float]:
    """Pixels in [0, 1]: the brightest, and the shares at black and above BRIGHT (a share of white)."""
    return {
        "brightest": pixels.max().item(),
        "black": (pixels <= 1e-3).float().mean().item(),
        f"above_{BRIGHT:g}": (pixels > BRIGHT).float().mean().item(),
    }


@torch.no_grad()
def probe(run: Path, n: int, seed: int) -> dict:
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    config = json.loads(checkpoint["config"]) if isinstance(checkpoint["config"], str) else checkpoint["config"]
    params = config["method_params"]
    if params.get("generator") != "dafl" or params.get("generators", 1) != 1:
        raise SystemExit(f"{run}: only runs with one dafl generator are read (this one: {params.get('generator')})")
    teacher_file = Path(yaml.safe_load((run / "config.yaml").read_text())["teacher"])
    if not teacher_file.exists():
        raise SystemExit(f"{run}: its teacher {teacher_file} is not here; run from the folder the run was started in")
    teacher = load_model(teacher_file)[0].eval()
    info = read_info(teacher_file)
    generator = DAFLGenerator(
        params["nz"],
        info.in_channels,
        info.image_size,
        params.get("gen_width") or 128,
        params["gen_output"],
        info.mean,
        info.std,
    )
    generator.load_state_dict(checkpoint["state"]["modules"]["generator"])
    z = torch.randn(n, params["nz"], generator=torch.Generator().manual_seed(seed))
    out = {"run": str(run)}
    for mode in ("eval", "train"):
        generator.train(mode == "train")
        images = torch.cat([generator(chunk) for chunk in z.split(128)])
        probs = torch.cat([teacher(chunk).softmax(1) for chunk in images.split(128)])
        out[mode] = {
            "class_histogram": torch.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist(),
            "teacher_confidence": probs.max(1).values.mean().item(),
            **pixel_figures(denormalize(images, info.mean, info.std).clamp(0, 1)),
        }
    real = load_dataset(info.dataset, image_size=info.image_size).test_images[:n]
    out["real"] = pixel_figures(real.float() / 255)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    parser.add_argument("--n", type=int, default=1024, help="samples (and real images) per run (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        print(json.dumps(probe(run, args.n, args.seed), indent=1))


if __name__ == "__main__":
    main()
