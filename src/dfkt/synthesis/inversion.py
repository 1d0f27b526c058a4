"""Pixel inversion: images optimised directly against the frozen teacher (DeepInversion/ADI, ZSKD)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkt.engine import Engine
from dfkt.engine.state import TrainState
from dfkt.errors import ConfigError
from dfkt.synthesis.base import Batch, Objective
from dfkt.synthesis.pool import ImagePool

# targets(n, rng) -> labels or soft labels for a batch.
Targets = Callable[[int, torch.Generator], Tensor]


def jitter_and_flip(images: Tensor, max_shift: int, flip: bool, rng: torch.Generator) -> Tensor:
    """DeepInversion's augmentation: a random circular shift of the whole batch, then a random flip."""
    if max_shift > 0:
        dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=rng, device=rng.device).tolist()
        images = torch.roll(images, shifts=(dx, dy), dims=(2, 3))
    if flip and torch.rand((), generator=rng, device=rng.device).item() < 0.5:
        images = torch.flip(images, dims=(3,))
    return images


def standardise_batch(images: Tensor) -> Tensor:
    """Each channel of the batch shifted and scaled to mean 0 and variance 1."""
    dims = [0, *range(2, images.dim())]
    return (images - images.mean(dim=dims, keepdim=True)) / images.std(dim=dims, keepdim=True).clamp_min(1e-6)


Start = Literal["noise", "dark"]


class PixelInversion:
    """``synthesize()`` starts a batch from N(0, 1) noise, takes ``iterations`` Adam steps on the
    objective (each on a jittered, flipped view), and adds the images with the teacher's logits to
    the pool; ``sample()`` draws from the pool. With ``pixel_range`` (per-channel low and high, in
    normalised units) the pixels are clamped into it after every step, as the ZSKD and DeepInversion
    authors' code clips to valid images.

    Two departures from the authors, for short budgets (dfkt's; benchmarks/analysis/batchnorm_pairs.md):
    ``start="dark"`` starts every pixel at black (the low end of ``pixel_range``) plus N(0, σ²) noise (σ =
    ``start_noise``, 0.1 by default) instead of N(0, 1); ``resolution=r`` optimises r×r images, bilinearly
    upsampled to the teacher's size, so they are smooth from the first step. Both keep a few dozen steps from
    leaving the images as high-contrast noise. ``standardise=True`` rescales every finished batch, per channel, to
    mean 0 and variance 1 and clamps it again: the teacher's input normalisation gives real batches these
    statistics, and a few dozen steps from black leave them dim (pixel std ~0.34 on a WRN-16-2), which trains the
    student's BatchNorm statistics on the wrong scale."""

    def __init__(
        self,
        state: TrainState,
        engine: Engine,
        teacher: nn.Module,
        pool: ImagePool,
        objective: Objective,
        targets: Targets,
        shape: tuple[int, int, int],
        batch: int,
        iterations: int,
        lr: float,
        betas: tuple[float, float],
        max_shift: int,
        flip: bool,
        pixel_range: tuple[Tensor, Tensor] | None = None,
        start: Start = "noise",
        resolution: int | None = None,
        standardise: bool = False,
        start_noise: float = 0.1,
    ):
        if start == "dark" and pixel_range is None:
            raise ConfigError(
                "start=dark needs the teacher's input range (its normalisation mean and std) and "
                "clamping on; set start=noise"
            )
        if standardise and pixel_range is None:
            raise ConfigError(
                "standardise=true needs the teacher's input normalisation (mean and std) with "
                "clamp=true; set clamp=true, or standardise=false"
            )
        if resolution is not None and not 1 <= resolution <= shape[-1]:
            raise ConfigError(f"resolution must be between 1 and the image side {shape[-1]}, got {resolution}")
        self.engine, self.teacher, self.pool = engine, teacher, pool
        self.objective, self.targets = objective, targets
        self.shape, self.batch, self.iterations = shape, batch, iterations
        self.lr, self.betas, self.max_shift, self.flip = lr, betas, max_shift, flip
        self.pixel_range, self.start, self.standardise = pixel_range, start, standardise
        self.start_noise = start_noise
        self.latent_shape = (shape[0], resolution, resolution) if resolution else shape
        self.rng = engine.rng("inversion")
        state.keep("inversion", self.rng)

    def initial_latent(self) -> Tensor:
        noise = torch.randn((self.batch, *self.latent_shape), device=self.engine.device, generator=self.rng)
        return noise if self.start == "noise" else self.pixel_range[0] + self.start_noise * noise

    def to_images(self, latent: Tensor) -> Tensor:
        """The optimised tensor as teacher-sized images (bilinear: a convex mix, so clamped stays clamped)."""
        if latent.shape[1:] == self.shape:
            return latent
        return F.interpolate(latent, size=self.shape[1:], mode="bilinear", align_corners=False)

    def synthesize(self) -> dict[str, Tensor | float]:
        latent = self.initial_latent().requires_grad_(True)
        targets = self.targets(self.batch, self.rng)
        optimizer = torch.optim.Adam([latent], lr=self.lr, betas=self.betas)
        terms: dict[str, Tensor] = {}
        for _ in range(self.iterations):
            terms = self.objective(
                jitter_and_flip(self.to_images(latent), self.max_shift, self.flip, self.rng), targets
            )
            self.engine.optimize(terms["loss"], optimizer, "pixel inversion loss")
            if self.pixel_range is not None:
                with torch.no_grad():
                    latent.copy_(self.clamp(latent))
        with torch.no_grad():
            images = self.to_images(latent.detach())
            if self.standardise:
                images = self.clamp(standardise_batch(images))
            self.pool.add(images, self.teacher(images))
        return {f"inv_{k}": v for k, v in terms.items()}

    def clamp(self, images: Tensor) -> Tensor:
        low, high = self.pixel_range
        return torch.maximum(torch.minimum(images, high), low)

    def sample(self, n: int, rng: torch.Generator) -> Batch:
        return self.pool.sample(n, rng)
