"""A PNG grid of synthetic samples, one row per teacher-predicted class."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: drawing needs no backend, so the caller's is left alone
from torch import Tensor

from dfkt.data import denormalize


def save_class_grid(
    images: Tensor,
    predicted: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    path: str | Path,
    per_class: int = 10,
) -> list[int]:
    """Save up to ``per_class`` samples for each predicted class; returns the class histogram."""
    pixels = denormalize(images.float().cpu(), mean, std)
    predicted = predicted.cpu()
    histogram = torch.bincount(predicted, minlength=num_classes).tolist()
    rows = min(num_classes, 20)  # a grid for 1000 classes would be unreadable
    fig = Figure(figsize=(per_class * 0.8, rows * 0.8 + 0.4))
    axes = fig.subplots(rows, per_class, squeeze=False)
    for c in range(rows):
        chosen = (predicted == c).nonzero().flatten()[:per_class]
        for j in range(per_class):
            ax = axes[c][j]
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(chosen):
                img = pixels[chosen[j]]
                shown = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
                ax.imshow(shown.numpy(), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
        axes[c][0].set_ylabel(f"{c} ({histogram[c]})", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("synthetic samples by teacher-predicted class (count)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return histogram
