"""Checks on generated samples that catch failures a final accuracy alone hides."""

from __future__ import annotations

import torch
from torch import Tensor

# A collapse when the two commonest teacher-predicted classes hold this share of the samples
# (with 10 classes an even spread puts 20% there), or when samples barely differ from each other.
TOP2_SHARE = 0.6
MIN_RELATIVE_SPREAD = 0.05
FIX = ("lower the generator learning rate (e.g. --set params.gen_lr=...), raise the class-diversity weight "
       "where the method has one (params.w_ie), or use a method with a built-in diversity term (rdskd)")


def collapse_warnings(images: Tensor, histogram: list[int]) -> list[str]:
    """Warnings for mode collapse: samples concentrated in one or two teacher classes, or nearly identical."""
    warnings = []
    total = sum(histogram)
    if len(histogram) >= 5 and total:
        top = sorted(range(len(histogram)), key=histogram.__getitem__, reverse=True)[:2]
        share = sum(histogram[c] for c in top) / total
        if share >= TOP2_SHARE:
            warnings.append(f"mode collapse: {100 * share:.0f}% of {total} generated samples fall in teacher classes "
                            f"{top[0]} and {top[1]}, so the student sees little of the others; {FIX}")
    flat = images.float().flatten(1)
    spread = flat.std(dim=0).mean() / flat.std().clamp_min(1e-12)
    if flat.shape[0] > 1 and spread < MIN_RELATIVE_SPREAD:
        warnings.append(f"mode collapse: the generated samples are nearly identical (spread across samples "
                        f"{spread:.3f} of the pixel spread); {FIX}")
    return warnings
