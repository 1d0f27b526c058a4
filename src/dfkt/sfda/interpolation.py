"""Weight-space interpolation of an adapted model with its source model.

    w = (1 − s) · w_adapted + s · w_source

over every floating-point tensor of the state dict (BatchNorm running statistics included; integer
counters are the adapted model's). The weight-space ensembles of WiSE-FT (Wortsman et al., "Robust
fine-tuning of zero-shot models", CVPR 2022): a model fine-tuned from another stays in its basin, so
the line between them holds models that keep part of each one's accuracy, and often beat both.

How much of the source to keep can be read from the two models' agreement, without labels
(``agreement_share``): on B4's tuning corruptions (benchmarks/analysis/sfda_compare.md, twelfth session)
the best share was 0.5-0.75 where the adapted model kept the source's class on 70-85% of the images
(mild noise, scale) and 0-0.25 where it kept it on 40-47% (motion blur).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


@torch.no_grad()
def interpolate_with_source(source: nn.Module, adapted: nn.Module, source_share: float) -> nn.Module:
    """A new model (a copy of ``adapted``, same device and mode) whose weights are ``source_share`` of
    ``source``'s and the rest of ``adapted``'s. Both must have the same architecture."""
    if not 0.0 <= source_share <= 1.0:
        raise ValueError(f"source_share must be in [0, 1], got {source_share}")
    ws, wa = source.state_dict(), adapted.state_dict()
    if ws.keys() != wa.keys():
        raise ValueError("the source and adapted models have different layers; they must be one architecture")
    net = copy.deepcopy(adapted)
    net.load_state_dict(
        {k: torch.lerp(wa[k], ws[k].to(wa[k]), source_share) if wa[k].is_floating_point() else wa[k] for k in wa}
    )
    return net


def agreement_rate(source_classes: Tensor, adapted_classes: Tensor) -> float:
    """r: the share of images on which the two models predict the same class."""
    return float((source_classes == adapted_classes).float().mean())


def agreement_share(source_classes: Tensor, adapted_classes: Tensor) -> float:
    """s = r² (``source_share=agreement``)."""
    return agreement_rate(source_classes, adapted_classes) ** 2


# The ramp's ends: no source below this agreement rate, all of it (statistics refit) above the other.
RAMP_FROM, RAMP_TO = 0.3, 0.8


def agreement_ramp_share(source_classes: Tensor, adapted_classes: Tensor) -> float:
    """s = clip((r − 0.3) / 0.5, 0, 1) (``source_share=agreement_ramp``): the source model whole (with
    ``reestimate_batchnorm``, its statistics refit) where adapting kept its class on 80% of the images or more.
    On B4's tuning corruptions with a BatchNorm2d source, SHOT and SHOT-IM kept it on 80% under impulse noise and
    lost 4 points doing so; there the refit source was the best model on the line and r² kept too little of it.
    On B5 (r 0.44-0.73) it keeps too much of the sources without BatchNorm2d: 1.8 points under r² on their mean,
    level (−0.2) on the BatchNorm2d ones (benchmarks/analysis/sfda_compare.md, twentieth session); hence
    ``source_share=auto``."""
    return ramp(agreement_rate(source_classes, adapted_classes))


def ramp(r: float) -> float:
    """The ramp's share for an agreement rate r: clip((r − 0.3) / 0.5, 0, 1)."""
    return min(1.0, max(0.0, (r - RAMP_FROM) / (RAMP_TO - RAMP_FROM)))


SHARE_RULES = {"agreement": agreement_share, "agreement_ramp": agreement_ramp_share}


def share_rule(setting: str, source: nn.Module) -> str:
    """The rule a ``source_share`` setting names for this source: itself, or for ``auto`` the ramp when the
    source has BatchNorm2d layers and r² otherwise. Why the architecture: with ``reestimate_batchnorm`` the
    line's source end is the source with its statistics refit on the target (BN-adapt's model), which on a
    BatchNorm2d source is often the best model on the line under mild shifts and worth keeping whole; a source
    whose only BatchNorm is a BatchNorm1d bottleneck gains less from the refit, and the ramp kept too much of it."""
    if setting != "auto":
        return setting
    has_bn2d = any(isinstance(m, nn.BatchNorm2d) for m in source.modules())
    return "agreement_ramp" if has_bn2d else "agreement"


@torch.no_grad()
def reestimate_batchnorm(net: nn.Module, images: Tensor, batch_size: int = 256) -> None:
    """Every BatchNorm layer's running statistics recomputed on ``images`` (a cumulative average over
    batches; dropout off, weights untouched), as SWA does after averaging weights: the mean and variance
    of interpolated weights' features are not the interpolated means and variances."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return
    before = [(m, m.training) for m in net.modules()]
    momenta = [m.momentum for m in layers]
    net.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        # Near-equal chunks: the cumulative average weighs batches, not images, so a short last batch
        # would count as much as a full one (and a batch of one image fails in BatchNorm1d).
        for chunk in torch.tensor_split(images, max(1, -(-len(images) // batch_size))):
            net(chunk)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, training in before:
            m.training = training
