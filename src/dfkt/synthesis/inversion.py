"""Pixel inversion: images optimised directly against the frozen teacher (DeepInversion/ADI, ZSKD)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from dfkt.engine import Engine
from dfkt.engine.state import TrainState
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


class PixelInversion:
    """``synthesize()`` starts a batch from N(0, 1) noise, takes ``iterations`` Adam steps on the
    objective (each on a jittered, flipped view), and adds the images with the teacher's logits to
    the pool; ``sample()`` draws from the pool. With ``pixel_range`` (per-channel low and high, in
    normalised units) the pixels are clamped into it after every step, as the ZSKD and DeepInversion
    authors' code clips to valid images."""

    def __init__(self, state: TrainState, engine: Engine, teacher: nn.Module, pool: ImagePool,
                 objective: Objective, targets: Targets, shape: tuple[int, int, int], batch: int, iterations: int,
                 lr: float, betas: tuple[float, float], max_shift: int, flip: bool,
                 pixel_range: tuple[Tensor, Tensor] | None = None):
        self.engine, self.teacher, self.pool = engine, teacher, pool
        self.objective, self.targets = objective, targets
        self.shape, self.batch, self.iterations = shape, batch, iterations
        self.lr, self.betas, self.max_shift, self.flip = lr, betas, max_shift, flip
        self.pixel_range = pixel_range
        self.rng = engine.rng("inversion")
        state.keep("inversion", self.rng)

    def synthesize(self) -> dict[str, Tensor | float]:
        device = self.engine.device
        images = torch.randn((self.batch, *self.shape), device=device, generator=self.rng).requires_grad_(True)
        targets = self.targets(self.batch, self.rng)
        optimizer = torch.optim.Adam([images], lr=self.lr, betas=self.betas)
        terms: dict[str, Tensor] = {}
        for _ in range(self.iterations):
            terms = self.objective(jitter_and_flip(images, self.max_shift, self.flip, self.rng), targets)
            self.engine.optimize(terms["loss"], optimizer, "pixel inversion loss")
            if self.pixel_range is not None:
                with torch.no_grad():
                    images.copy_(torch.maximum(torch.minimum(images, self.pixel_range[1]), self.pixel_range[0]))
        with torch.no_grad():
            self.pool.add(images.detach(), self.teacher(images))
        return {f"inv_{k}": v for k, v in terms.items()}

    def sample(self, n: int, rng: torch.Generator) -> Batch:
        return self.pool.sample(n, rng)
