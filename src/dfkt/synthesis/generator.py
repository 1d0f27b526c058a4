"""A generator network as the data source (DAFL, MSKD, DFAD, ZSKT; RDSKD)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfkt.engine import Engine
from dfkt.engine.state import TrainState
from dfkt.synthesis.base import Batch, Objective



class GeneratorSynthesizer:
    """Online: ``synthesize()`` draws a batch and takes one optimiser step on ``objective``, while
    the student learns from ``sample()`` (DAFL, MSKD, DFAD, ZSKT, RDSKD's stage 2).
    Frozen: a later stage lists ``generator`` as frozen (eval mode, BatchNorm running statistics,
    no gradients) and only calls ``sample()`` (RDSKD's stage 3).

    ``reuse_latest`` makes ``sample()`` return the batch the last update made, as DAFL's code
    trains the student on the very images of the generator step; an objective that returns
    ``teacher_logits`` saves the student's step a second teacher forward on them.
    """

    def __init__(self, state: TrainState, engine: Engine, generator: nn.Module, nz: int, lr: float, batch: int,
                 objective: Objective, betas: tuple[float, float] = (0.9, 0.999), reuse_latest: bool = False):
        self.engine = engine
        self.nz = nz
        self.batch = batch
        self.objective = objective
        self.reuse_latest = reuse_latest
        self.generator = engine.prepare(generator, trainable=True)
        self.optimizer = engine.prepare_optimizer(torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas))
        self.rng = engine.noise_generator(offset=1)
        state.modules["generator"] = self.generator
        state.optimizers["generator"] = self.optimizer
        state.rngs["generator"] = self.rng
        self.latest: Batch | None = None

    def noise(self, n: int, rng: torch.Generator) -> Tensor:
        return torch.randn(n, self.nz, device=self.engine.device, generator=rng)

    def synthesize(self) -> dict[str, Tensor | float]:
        z = self.noise(self.batch, self.rng)
        images = self.generator(z)
        terms = self.objective(images, z)
        logits = terms.pop("teacher_logits", None)
        self.engine.optimize(terms["loss"], self.optimizer, "generator loss")
        self.latest = images.detach(), None if logits is None else logits.detach()
        return {f"g_{k}" if k == "loss" else k: v for k, v in terms.items()}

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator) -> Batch:
        if self.reuse_latest and self.latest is not None:
            images, logits = self.latest
            return images[:n], None if logits is None else logits[:n]
        return self.generator(self.noise(n, rng)), None
