"""A generator trained afresh for every batch, feeding a pool (CMI, Fast).

Each ``synthesize()`` round fixes a batch of targets, starts a generator from a fresh random
initialisation (CMI, Fang et al. IJCAI 2021) or from a meta-learned one (Fast, Fang et al.
AAAI 2022), optimises it and its input noise z for ``iterations`` steps on the objective, and
adds the final images to the pool. Fast then moves the meta-initialisation towards the adapted
weights with Reptile: an Adam step on θ with gradient θ − θ', at lr·iterations. (The authors'
scripts default to first-order MAML; Reptile is their other option and the one shipped here.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dfkt.engine import Engine
from dfkt.engine.state import TrainState
from dfkt.synthesis.base import Batch, Objective
from dfkt.synthesis.pool import ImagePool


def reinitialise(module: nn.Module) -> None:
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


class GeneratorInversion:
    """``synthesize()`` trains a generator from a fresh (CMI) or meta-learned (Fast) start for one
    batch and adds its images to the pool; ``sample()`` draws from the pool."""

    def __init__(
        self,
        state: TrainState,
        engine: Engine,
        teacher: nn.Module,
        pool: ImagePool,
        objective: Objective,
        num_classes: int,
        generator: nn.Module,
        nz: int,
        batch: int,
        iterations: int,
        lr: float,
        z_lr: float,
        betas: tuple[float, float],
        meta: bool = False,
        on_round_end: Callable[[], None] | None = None,
        extra_params: list[nn.Parameter] = (),
    ):
        self.engine, self.teacher, self.pool, self.objective = engine, teacher, pool, objective
        self.num_classes, self.nz, self.batch, self.iterations = num_classes, nz, batch, iterations
        self.lr, self.z_lr, self.betas, self.meta = lr, z_lr, betas, meta
        self.on_round_end = on_round_end
        self.extra_params = list(extra_params)  # trained with each round's generator (CMI's head)
        self.generator = generator.to(engine.device)
        self.rng = engine.rng("inversion")
        state.keep("inversion", self.rng)
        if meta:  # Fast: the meta-initialisation and its optimizer are trained state
            self.initial = copy.deepcopy(self.generator)
            self.meta_optimizer = torch.optim.Adam(self.initial.parameters(), lr=lr * iterations, betas=betas)
            state.keep("meta_generator", self.initial, self.meta_optimizer)

    def _start(self) -> None:
        if not self.meta:
            device = self.engine.device
            # A re-initialisation drawn from our own stream, leaving the global RNGs as they were.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.rng, device=self.rng.device)))
                reinitialise(self.generator)
        else:
            self.generator.load_state_dict(self.initial.state_dict())

    def synthesize(self) -> dict[str, Tensor | float]:
        self._start()
        self.generator.train()
        device = self.engine.device
        z = torch.randn(self.batch, self.nz, device=device, generator=self.rng).requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (self.batch,), device=device, generator=self.rng)
        groups = [{"params": [*self.generator.parameters(), *self.extra_params]}, {"params": [z], "lr": self.z_lr}]
        optimizer = torch.optim.Adam(groups, lr=self.lr, betas=self.betas)
        terms: dict[str, Tensor] = {}
        for _ in range(self.iterations):
            images = self.generator(z)
            terms = self.objective(images, targets)
            self.engine.optimize(terms["loss"], optimizer, "generator inversion loss")
        with torch.no_grad():
            images = self.generator(z)
            self.pool.add(images, self.teacher(images))
        if self.meta:
            for initial, adapted in zip(self.initial.parameters(), self.generator.parameters()):
                initial.grad = initial.detach() - adapted.detach()
            self.meta_optimizer.step()
        if self.on_round_end is not None:
            self.on_round_end()
        return {f"inv_{k}": v for k, v in terms.items()}

    def sample(self, n: int, rng: torch.Generator) -> Batch:
        return self.pool.sample(n, rng)
