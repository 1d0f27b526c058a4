"""Checks on generated samples that catch failures a final accuracy alone hides."""

from __future__ import annotations

from pydantic import BaseModel
from torch import Tensor

# A collapse when the two commonest teacher-predicted classes hold this share of the samples
# (with 10 classes an even spread puts 20% there), or when samples barely differ from each other.
TOP2_SHARE = 0.6
MIN_RELATIVE_SPREAD = 0.05


def collapse_fix(params: BaseModel) -> str:
    """The remedy, in terms of the settings the method has."""
    fixes = []
    if hasattr(params, "gen_lr"):
        fixes.append(f"lower the generator learning rate (--set params.gen_lr=..., now {params.gen_lr:g})")
    if hasattr(params, "w_ie"):
        fixes.append(f"raise the class-diversity weight (params.w_ie, now {params.w_ie:g})")
    fixes.append("or use rdskd, whose loss seeks class and sample diversity without weights to tune")
    return "; ".join(fixes)


def collapse_warnings(images: Tensor, histogram: list[int], params: BaseModel) -> list[str]:
    """Warnings for mode collapse: samples concentrated in one or two teacher classes, or nearly identical."""
    warnings = []
    total = sum(histogram)
    if len(histogram) >= 5 and total:
        top = [c for c in sorted(range(len(histogram)), key=histogram.__getitem__, reverse=True)[:2] if histogram[c]]
        share = sum(histogram[c] for c in top) / total
        if share >= TOP2_SHARE:
            where = f"class {top[0]}" if len(top) == 1 else f"classes {top[0]} and {top[1]}"
            warnings.append(f"mode collapse: {100 * share:.0f}% of {total} generated samples fall in teacher {where}, "
                            f"so the student sees little of the others; {collapse_fix(params)}")
    flat = images.float().flatten(1)
    if flat.shape[0] > 1:
        spread = flat.std(dim=0).mean() / flat.std().clamp_min(1e-12)
        if spread < MIN_RELATIVE_SPREAD:
            warnings.append(f"mode collapse: the generated samples are nearly identical (spread across samples "
                            f"{spread:.3f} of the pixel spread); {collapse_fix(params)}")
    return warnings
