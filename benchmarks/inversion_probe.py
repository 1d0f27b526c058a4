"""How far pixel inversion gets on a BatchNorm teacher in a few minutes, and what a student learns from it.

A diagnostic, not a method: it inverts BATCHES batches of BATCH images for ITERS Adam steps each against
the teacher's cross-entropy plus its standardised BatchNorm-statistics distance (dfkt.synthesis.bn_prior),
from N(0, 1) noise or from black (--start dark), at the teacher's side or at --resolution R upsampled
bilinearly, then trains a fresh student by KD (temperature 4, SGD one-cycle) for STEPS steps on that fixed
pool with shifts and flips, relabelled by the teacher. It prints the BatchNorm gap (mean per layer; a real
batch reads ~0.3), the student's test accuracy, its agreement with the teacher on its own pool, and - as a
diagnosis only, never a result - its accuracy with its BatchNorm statistics re-estimated on 2,000 real
training images. `--real` trains the same student on real training images instead (the student's ceiling
at this step count). `--transforms none standardise` trains `--students` students on the pool as inverted
and on the same pool with each batch rescaled to pixel mean 0 and variance 1 (DeepInversion's
`params.standardise`), so the rescaling is compared on identical images.

    python benchmarks/inversion_probe.py runs/bench-dfkd-compare-b2-wrn/teacher --student wrn16_1 \\
        --start dark --resolution 16 --seed 1 [--transforms none standardise gain]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkt import losses
from dfkt.data import load_dataset
from dfkt.models import build_model
from dfkt.models.files import load_model, read_info
from dfkt.synthesis.bn_prior import BNStatsPrior
from dfkt.synthesis.inversion import standardise_batch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path, help="a teacher folder (model.safetensors) with BatchNorm layers")
    parser.add_argument("--student", default="wrn16_1")
    parser.add_argument("--start", choices=("noise", "dark"), default="noise")
    parser.add_argument("--resolution", type=int, default=None, help="optimised side (default: the teacher's)")
    parser.add_argument(
        "--input-prior",
        type=float,
        default=0.0,
        help="weight of the input-statistics term: normalised pixels of mean 0 and variance 1",
    )
    parser.add_argument(
        "--standardise-steps",
        action="store_true",
        help="rescale the batch to pixel mean 0, variance 1 (then clamp) after every Adam step",
    )
    parser.add_argument(
        "--transforms",
        nargs="+",
        choices=TRANSFORMS,
        metavar="T",
        help="compare these rescalings of each finished batch on the same pool, --students students "
        "each (seeds 100, 101, ...): none, standardise (mean 0, variance 1 per channel, as "
        "DeepInversion's params.standardise), gain (stretched about black to std 1)",
    )
    parser.add_argument("--students", type=int, default=3, help="students per transform (with --transforms)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam lr on the pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300, help="student steps")
    parser.add_argument("--student-batch", type=int, default=128)
    parser.add_argument("--real", action="store_true", help="train the student on real images instead")
    parser.add_argument(
        "--run",
        type=Path,
        metavar="DIR",
        help="instead: diagnose a finished distill run's student (its accuracy with BatchNorm "
        "statistics of real images and of its own pool) and the teacher's classes on its pool",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


TRANSFORMS = ("none", "standardise", "gain")


def input_statistics_gap(images: Tensor) -> Tensor:
    """‖μ_c‖₂ + ‖σ²_c − 1‖₂ over channels: the normalisation makes real pixels mean 0, variance 1."""
    dims = [0, 2, 3]
    return torch.linalg.vector_norm(images.mean(dim=dims)) + torch.linalg.vector_norm(
        images.var(dim=dims, unbiased=False) - 1
    )


class Probe:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        path = args.teacher / "model.safetensors" if args.teacher.is_dir() else args.teacher
        self.teacher = load_model(path)[0].eval().requires_grad_(False).to(memory_format=torch.channels_last)
        info = read_info(path)
        self.data = load_dataset(info.dataset, image_size=info.image_size)
        self.side, self.channels = info.image_size, info.in_channels
        self.low = torch.tensor([-m / s for m, s in zip(self.data.mean, self.data.std)]).view(1, -1, 1, 1)
        self.high = torch.tensor([(1 - m) / s for m, s in zip(self.data.mean, self.data.std)]).view(1, -1, 1, 1)
        self.rng = torch.Generator().manual_seed(args.seed)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        with torch.no_grad(), self.autocast():
            return model(x.contiguous(memory_format=torch.channels_last)).float()

    def shift_and_flip(self, x: Tensor) -> Tensor:
        dx, dy = torch.randint(0, 5, (2,), generator=self.rng).tolist()
        x = F.pad(x, (2, 2, 2, 2), mode="replicate")[:, :, dy : dy + self.side, dx : dx + self.side]
        flip = torch.rand(x.shape[0], generator=self.rng) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    def invert(self) -> tuple[Tensor, dict]:
        a = self.args
        prior = BNStatsPrior(self.teacher, "probe", distance="standardised")
        side = a.resolution or self.side
        batches, gaps, start = [], [], time.time()
        for _ in range(a.batches):
            noise = torch.randn(a.batch, self.channels, side, side, generator=self.rng)
            latent = (noise if a.start == "noise" else self.low + 0.1 * noise).requires_grad_(True)
            targets = torch.randint(0, self.data.num_classes, (a.batch,), generator=self.rng)
            optimizer = torch.optim.Adam([latent], lr=a.lr, betas=(0.5, 0.99))
            for _ in range(a.iters):
                images = F.interpolate(latent, size=self.side, mode="bilinear") if side != self.side else latent
                with prior.record(), self.autocast():
                    logits = self.teacher(self.shift_and_flip(images).contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits.float(), targets) + prior.loss()
                if a.input_prior:
                    loss = loss + a.input_prior * input_statistics_gap(images)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    if a.standardise_steps:
                        latent.copy_(standardise_batch(latent))
                    latent.copy_(self.clamp(latent))
            images = (F.interpolate(latent, size=self.side, mode="bilinear") if side != self.side else latent).detach()
            with prior.record():
                self.logits(self.teacher, images)
            gaps.append(prior.loss().item() / len(prior.layers))
            batches.append(images)
        prior.remove()
        pool = torch.cat(batches)
        classes = torch.bincount(self.logits(self.teacher, pool).argmax(1), minlength=self.data.num_classes)
        return pool, {
            "synthesis_s": round(time.time() - start),
            "bn_gap": round(sum(gaps) / len(gaps), 2),
            "pixel_mean": round(pool.mean().item(), 2),
            "pixel_std": round(pool.std().item(), 2),
            "classes": classes.tolist(),
        }

    def train_student(self, draw) -> nn.Module:
        a = self.args
        student = build_model(a.student, self.data.num_classes, self.channels, self.side)
        student = student.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=a.steps, pct_start=0.15)
        for _ in range(a.steps):
            x = self.shift_and_flip(draw())
            with self.autocast():
                loss = losses.kd_loss(
                    student(x.contiguous(memory_format=torch.channels_last)).float(), self.logits(self.teacher, x), 4.0
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        return student.eval()

    def accuracy(self, model: nn.Module) -> float:
        x, y = self.data.normalize(self.data.test_images), self.data.test_labels
        return sum(
            (self.logits(model, x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()
            for i in range(0, len(x), 1000)
        ) / len(x)

    def clamp(self, x: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(x, self.high), self.low)

    def transformed(self, pool: Tensor, kind: str) -> Tensor:
        """Each synthesis batch of the pool rescaled (``kind`` in TRANSFORMS) and clamped again."""
        if kind == "none":
            return pool
        batches = pool.split(self.args.batch)
        if kind == "standardise":
            return torch.cat([self.clamp(standardise_batch(b)) for b in batches])
        return torch.cat([self.clamp(self.low + (b - self.low) / b.std()) for b in batches])

    def accuracy_with_bn_statistics_of(self, student: nn.Module, images: Tensor) -> float:
        """The student's test accuracy with its BatchNorm statistics re-estimated on the first 2,000 ``images``."""
        student = copy.deepcopy(student).train()
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
        for i in range(0, 2000, 200):
            self.logits(student, images[i : i + 200])
        return self.accuracy(student.eval())

    def accuracy_with_real_bn_statistics(self, student: nn.Module) -> float:
        """Diagnosis only: how much of the loss is the student's BatchNorm statistics of synthetic images."""
        return self.accuracy_with_bn_statistics_of(student, self.data.normalize(self.data.train_images[:2000]))


def diagnose_run(probe: Probe, run: Path) -> None:
    student = load_model(run / "student.safetensors")[0].eval()
    pool = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]["buffers"]["pool.images"]
    classes = torch.cat([probe.logits(probe.teacher, b).argmax(1) for b in pool.split(1000)])
    print(
        json.dumps(
            {
                "run": str(run),
                "student_acc": probe.accuracy(student),
                "acc_with_bn_statistics_of_its_pool": probe.accuracy_with_bn_statistics_of(student, pool),
                "diagnosis_acc_with_real_bn_statistics": probe.accuracy_with_real_bn_statistics(student),
                "pool_pixel_mean": round(pool.mean().item(), 2),
                "pool_pixel_std": round(pool.std().item(), 2),
                "pool_classes": torch.bincount(classes, minlength=probe.data.num_classes).tolist(),
            }
        )
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    probe = Probe(args)
    n = args.student_batch
    if args.run:
        diagnose_run(probe, args.run)
        return
    if args.real:
        train = probe.data.train_images
        student = probe.train_student(
            lambda: probe.data.normalize(train[torch.randint(0, len(train), (n,), generator=probe.rng)])
        )
        print(json.dumps({"data": "real", "steps": args.steps, "student_acc": probe.accuracy(student)}))
        return
    pool, stats = probe.invert()
    if args.transforms:
        print(json.dumps({"seed": args.seed, "images": len(pool), **stats}))
        for kind in args.transforms:
            x = probe.transformed(pool, kind)
            accs, diagnoses = [], []
            for s in range(args.students):
                probe.rng = torch.Generator().manual_seed(100 + s)
                student = probe.train_student(lambda: x[torch.randint(0, len(x), (n,), generator=probe.rng)])
                accs.append(round(100 * probe.accuracy(student), 1))
                diagnoses.append(round(100 * probe.accuracy_with_real_bn_statistics(student), 1))
            print(
                json.dumps(
                    {
                        "transform": kind,
                        "student_acc_mean": round(sum(accs) / len(accs), 1),
                        "student_acc": accs,
                        "diagnosis_acc_with_real_bn_statistics": diagnoses,
                        "pixel_mean": round(x.mean().item(), 2),
                        "pixel_std": round(x.std().item(), 2),
                    }
                )
            )
        return
    student = probe.train_student(lambda: pool[torch.randint(0, len(pool), (n,), generator=probe.rng)])
    agreement = (probe.logits(student, pool).argmax(1) == probe.logits(probe.teacher, pool).argmax(1)).float().mean()
    print(
        json.dumps(
            {
                "start": args.start,
                "resolution": args.resolution,
                "seed": args.seed,
                "images": len(pool),
                **stats,
                "steps": args.steps,
                "student_acc": probe.accuracy(student),
                "pool_agreement": round(agreement.item(), 3),
                "diagnosis_acc_with_real_bn_statistics": probe.accuracy_with_real_bn_statistics(student),
            }
        )
    )


if __name__ == "__main__":
    main()
