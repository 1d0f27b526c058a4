"""Cheap tensor augmentations that run on the device, batched, with a private RNG."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_and_flip(images: Tensor, rng: torch.Generator, max_shift: int | None = None) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (default: 1/16 of the width) and a
    horizontal flip, per sample. Fills with zeros: the mean, for normalised images."""
    n, _, h, w = images.shape
    max_shift = max_shift if max_shift is not None else max(1, w // 16)
    padded = torch.nn.functional.pad(images, [max_shift] * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), device=images.device, generator=rng)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), device=images.device, generator=rng)
    rows = (dy[:, None] + torch.arange(h, device=images.device)[None, :])  # n × h
    cols = (dx[:, None] + torch.arange(w, device=images.device)[None, :])  # n × w
    flip = torch.rand(n, device=images.device, generator=rng) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # n × h × w × c
    return out.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: already channels_last
