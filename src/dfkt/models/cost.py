"""What one forward pass of a network costs, counted rather than timed."""

from __future__ import annotations

import torch
from torch import nn


def multiply_adds(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of convolutions and linear layers for one forward of ``example`` (batch of 1), in
    eval mode and without gradients; the module's mode is restored."""
    total = 0

    def count(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += output[0].numel() * layer.kernel_size[0] * layer.kernel_size[1] * layer.in_channels // layer.groups
        elif isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            module(example)
    finally:
        for m, training in modes:
            m.training = training
        for hook in hooks:
            hook.remove()
    return total
