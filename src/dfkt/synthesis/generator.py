"""A generator network as the data source (DAFL, MSKD, DFAD, ZSKT; RDSKD)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dfkt.engine import Engine
from dfkt.engine.state import TrainState
from dfkt.models import build_generator
from dfkt.synthesis.base import Batch

# objective(images, z) -> named terms including "loss", which the generator minimises.
Objective = Callable[[Tensor, Tensor], dict[str, Tensor]]


class GeneratorSynthesizer:
    """Online: ``synthesize()`` draws a batch and takes one optimiser step on ``objective``, while
    the student learns from ``sample()`` (DAFL, MSKD, DFAD, ZSKT, RDSKD's stage 2).
    Frozen: a later stage lists ``generator`` as frozen (eval mode, BatchNorm running statistics,
    no gradients) and only calls ``sample()`` (RDSKD's stage 3).

    ``reuse_latest`` makes ``sample()`` return the batch the last update made, as DAFL's code
    trains the student on the very images of the generator step.
    """

    def __init__(self, state: TrainState, engine: Engine, arch: str, nz: int, channels: int, image_size: int,
                 lr: float, batch: int, objective: Objective, betas: tuple[float, float] = (0.9, 0.999),
                 reuse_latest: bool = False):
        self.engine = engine
        self.nz = nz
        self.batch = batch
        self.objective = objective
        self.reuse_latest = reuse_latest
        self.generator = engine.prepare(build_generator(arch, nz, channels, image_size), trainable=True)
        self.optimizer = engine.prepare_optimizer(torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas))
        self.rng = engine.noise_generator(offset=1)
        state.modules["generator"] = self.generator
        state.optimizers["generator"] = self.optimizer
        state.rngs["generator"] = self.rng
        self.latest: Tensor | None = None

    def noise(self, n: int, rng: torch.Generator) -> Tensor:
        return torch.randn(n, self.nz, device=self.engine.device, generator=rng)

    def synthesize(self) -> dict[str, Tensor | float]:
        z = self.noise(self.batch, self.rng)
        images = self.generator(z)
        terms = self.objective(images, z)
        self.engine.optimize(terms["loss"], self.optimizer, "generator loss")
        self.latest = images.detach()
        return {f"g_{k}" if k == "loss" else k: v for k, v in terms.items()}

    @torch.no_grad()
    def fresh(self, n: int, rng: torch.Generator) -> Tensor:
        """``n`` new images from the generator in its current mode."""
        return self.generator(self.noise(n, rng))

    def sample(self, n: int, rng: torch.Generator) -> Batch:
        if self.reuse_latest and self.latest is not None:
            return self.latest[:n], None
        return self.fresh(n, rng), None
