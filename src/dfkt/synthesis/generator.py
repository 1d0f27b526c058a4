"""A generator network as the data source (DAFL, MSKD, DFAD, ZSKT; RDSKD)."""

from __future__ import annotations

from collections.abc import Callable

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
    ``teacher_logits`` saves the student's step a second teacher forward on them. With
    ``redraw_after_update`` that batch is instead G(z) drawn again after the update with the same z
    (ZSKT's code: one z serves the generator step and the student steps after it).
    ``clip_norm`` bounds the generator's gradient norm; ``lr_factor`` (called before each update)
    multiplies its initial lr, so it can follow another schedule.
    """

    def __init__(
        self,
        state: TrainState,
        engine: Engine,
        generator: nn.Module,
        nz: int,
        lr: float,
        batch: int,
        objective: Objective,
        betas: tuple[float, float] = (0.9, 0.999),
        reuse_latest: bool = False,
        redraw_after_update: bool = False,
        clip_norm: float | None = None,
        lr_factor: Callable[[], float] | None = None,
    ):
        self.engine = engine
        self.nz = nz
        self.batch = batch
        self.objective = objective
        self.reuse_latest = reuse_latest
        self.redraw_after_update = redraw_after_update
        self.clip_norm = clip_norm
        self.lr_factor = lr_factor
        self.generator = engine.prepare(generator, trainable=True)
        self.optimizer = engine.prepare_optimizer(torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas))
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.rng = engine.rng("generator")
        state.keep("generator", self.generator, self.optimizer, self.rng)
        self.latest: Batch | None = None

    def noise(self, n: int, rng: torch.Generator) -> Tensor:
        return torch.randn(n, self.nz, device=self.engine.device, generator=rng)

    def synthesize(self) -> dict[str, Tensor | float]:
        z = self.noise(self.batch, self.rng)
        images = self.generator(z)
        terms = self.objective(images, z)
        logits = terms.pop("teacher_logits", None)
        if self.lr_factor is not None:
            factor = self.lr_factor()
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
        self.engine.optimize(terms["loss"], self.optimizer, "generator loss", self.clip_norm)
        if self.redraw_after_update:
            with torch.no_grad():
                self.latest = self.generator(z).detach(), None
        else:
            self.latest = images.detach(), None if logits is None else logits.detach()
        return {f"g_{k}" if k == "loss" else k: v for k, v in terms.items()}

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator) -> Batch:
        if self.reuse_latest and self.latest is not None:
            images, logits = self.latest
            return images[:n], None if logits is None else logits[:n]
        return self.generator(self.noise(n, rng)), None
