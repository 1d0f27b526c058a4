"""Weight-space interpolation of an adapted model with its source model.

    w = (1 − s) · w_adapted + s · w_source

over every floating-point tensor of the state dict (BatchNorm running statistics included; integer
counters are the adapted model's). The weight-space ensembles of WiSE-FT (Wortsman et al., "Robust
fine-tuning of zero-shot models", CVPR 2022): a model fine-tuned from another stays in its basin, so
the line between them holds models that keep part of each one's accuracy, and often beat both.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


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
