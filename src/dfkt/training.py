"""Small pieces every training loop here shares: optimizers, SHOT's lr decay, epoch batches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfkt.engine import Engine
from dfkt.engine.state import TrainState
from dfkt.errors import ConfigError


def make_optimizer(
    params: list[nn.Parameter],
    kind: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
    )


def shot_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """SHOT's schedule (Liang et al., ICML 2020): lr · (1 + 10 t/T)^−0.75."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: (1 + 10 * t / max(1, total_steps)) ** -0.75)


class EpochBatches:
    """Batch indices from a seeded permutation of ``n`` items, a new one every epoch. The order and its
    random stream (``order``, the same on every rank) are kept in ``state``, so a resumed run continues the
    same epoch.
    A last batch of a single item joins the one before: BatchNorm cannot train on one sample.

    With several processes the permutation is the same on every rank and each takes an equal
    share of it (``n // world_size`` items, the rest left for that epoch), so every rank makes the
    same number of steps of equal batches.
    """

    def __init__(self, state: TrainState, engine: Engine, n: int, batch_size: int):
        self.state, self.engine, self.batch_size = state, engine, batch_size
        self.n, self.rank, self.world = n, engine.fabric.global_rank, engine.world_size
        self.share = n // self.world
        if self.share < 1:
            raise ConfigError(f"{n} item(s) cannot be split between {self.world} processes; use fewer processes")
        state.keep("order", engine.rng("order", per_rank=False), torch.arange(n, device=engine.device))
        full, rest = divmod(self.share, batch_size)
        self.steps_per_epoch = max(1, full + (rest > 1))

    def __call__(self, i: int) -> Tensor:
        position = i % self.steps_per_epoch
        if position == 0:
            self.state.buffers["order"] = torch.randperm(
                self.n, device=self.engine.device, generator=self.state.rngs["order"]
            )
        mine = self.state.buffers["order"][self.rank * self.share : (self.rank + 1) * self.share]
        start = position * self.batch_size
        end = self.share if position == self.steps_per_epoch - 1 else start + self.batch_size
        return mine[start:end]
