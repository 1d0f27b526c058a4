"""BatchNorm-statistics prior (DeepInversion, Yin et al. CVPR 2020; used by CMI and Fast).

A teacher's BatchNorm layers remember the mean and variance of their inputs on the real
training data. Synthetic images should reproduce them:
    L_bn = Σ_l m_l · (‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂)
with μ_l, σ²_l the per-channel statistics of the batch at the input of layer l and m_l = 1
except for the first layer (``first_multiplier``). Fast (Fang et al., AAAI 2022) compares an
EMA of past synthetic batches' statistics mixed with the current ones instead (``momentum``).
Forward hooks make it work on any teacher with BatchNorm layers.

``distance="standardised"`` (dfkt's, not the papers') measures each layer in its own units:
    ‖(μ_l(x) − μ̂_l) / σ̂_l‖₂ + ‖(σ²_l(x) − σ̂²_l) / σ̂²_l‖₂.
The raw norms weigh a layer by the scale of its activations. On a pre-activation WRN-16-2 trained on
Fashion-MNIST the last BatchNorm (running variance ~31) held half of the raw loss on noise images, and
24.5 even on a real batch, while the first layer, where noise and real images differ most, weighed
0.4; standardised, every layer of a real batch reads 0.06-1.1 and of noise 4-23
(benchmarks/analysis/batchnorm_pairs.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from dfkt.errors import ConfigError


def statistics_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that remember statistics (track_running_stats=False ones have nothing to match)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


def no_statistics_reason(model: nn.Module) -> str:
    """Why ``statistics_layers(model)`` found none, for messages."""
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return "a TorchScript teacher hides them (load it as torchvision:NAME or module:function instead)"
    return "this teacher has none that keep running statistics"


class BNStatsPrior:
    def __init__(
        self,
        teacher: nn.Module,
        method: str,
        first_multiplier: float = 1.0,
        momentum: float | None = None,
        distance: Literal["raw", "standardised"] = "raw",
    ):
        self.layers = statistics_layers(teacher)
        if not self.layers:
            why = no_statistics_reason(teacher)
            raise ConfigError(
                f"{method} needs a teacher with BatchNorm layers (it matches their stored statistics) and {why}; "
                "use rdskd, dafl, mskd, dfad, zskt or zskd, or turn the prior off with --set params.w_bn=0"
            )
        self.first_multiplier = first_multiplier
        self.momentum = momentum
        self.standardised = distance == "standardised"
        self.active = False
        self.terms: dict[int, Tensor] = {}  # by layer, from the last recorded forward
        self.batch_stats: dict[int, tuple[Tensor, Tensor]] = {}
        self.ema: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        # Kept so remove() can take them off: a teacher reused by a later prior (tests, the Python API,
        # sweeps in one process) must not keep firing this one's hooks, nor keep it alive.
        self.handles = [layer.register_forward_hook(self._hook(index)) for index, layer in enumerate(self.layers)]

    def remove(self) -> None:
        """Take the hooks off the teacher; the prior records nothing afterwards."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, index: int):
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.active:
                return
            if layer.training:  # the forward has just moved running_mean/var towards this very batch
                raise RuntimeError(
                    "the BatchNorm prior read a teacher layer in train mode: its running statistics "
                    "are no longer the real data's; put the teacher in eval mode"
                )
            x = inputs[0].float()
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
            self.batch_stats[index] = (mean.detach(), var.detach())
            ema = self.ema[index]
            if self.momentum is not None and ema is not None:
                mean = self.momentum * ema[0] + (1 - self.momentum) * mean
                var = self.momentum * ema[1] + (1 - self.momentum) * var
            mean_error, var_error = mean - layer.running_mean, var - layer.running_var
            if self.standardised:
                mean_error = mean_error / (layer.running_var + layer.eps).sqrt()
                var_error = var_error / (layer.running_var + layer.eps)
            loss = torch.linalg.vector_norm(mean_error) + torch.linalg.vector_norm(var_error)
            self.terms[index] = loss * (self.first_multiplier if index == 0 else 1.0)

        return hook

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Collect the statistics of teacher forwards inside the block only (student steps pay nothing)."""
        self.terms, self.batch_stats, self.active = {}, {}, True
        try:
            yield
        finally:
            self.active = False

    def loss(self) -> Tensor:
        """L_bn of the last recorded teacher forward."""
        if not self.terms:
            raise RuntimeError("no teacher forward was recorded; call the teacher inside record()")
        return torch.stack(list(self.terms.values())).sum()

    def update_ema(self) -> None:
        """Fold the last recorded batch into the EMA of synthetic statistics (Fast)."""
        if self.momentum is None:
            return
        for index, (mean, var) in self.batch_stats.items():
            ema = self.ema[index]
            self.ema[index] = (
                (mean, var)
                if ema is None
                else (
                    self.momentum * ema[0] + (1 - self.momentum) * mean,
                    self.momentum * ema[1] + (1 - self.momentum) * var,
                )
            )

    def ema_state(self) -> Tensor:
        """The EMA as one flat tensor, for checkpoints (empty before the first update)."""
        if any(e is None for e in self.ema):
            return torch.zeros(0)
        return torch.cat([torch.cat(e) for e in self.ema])  # type: ignore[arg-type]

    def load_ema_state(self, flat: Tensor) -> None:
        if flat.numel() == 0:
            return
        offset = 0
        for index, layer in enumerate(self.layers):
            c = layer.running_mean.numel()
            self.ema[index] = (
                flat[offset : offset + c].to(layer.running_mean.device),
                flat[offset + c : offset + 2 * c].to(layer.running_mean.device),
            )
            offset += 2 * c


def bn_prior_or_none(
    teacher: nn.Module,
    method: str,
    weight: float,
    first_multiplier: float = 1.0,
    momentum: float | None = None,
    distance: Literal["raw", "standardised"] = "raw",
) -> BNStatsPrior | None:
    """The prior, or None when its weight is 0 (so a BatchNorm-free teacher can run without it)."""
    return BNStatsPrior(teacher, method, first_multiplier, momentum, distance) if weight > 0 else None


def forward_with_prior(
    prior: BNStatsPrior | None, forward: Callable[[Tensor], Tensor], images: Tensor
) -> tuple[Tensor, Tensor]:
    """``forward(images)`` and the prior's loss on that forward (0 without a prior)."""
    if prior is None:
        out = forward(images)
        return out, out.new_zeros(())
    with prior.record():
        out = forward(images)
    return out, prior.loss()
