"""Checks on generated samples that catch failures a final accuracy alone hides."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from dfkt.errors import ConfigError, DfktError
from dfkt.synthesis import BNStatsPrior

# A collapse when the two commonest teacher-predicted classes hold this share of the samples
# (with 10 classes an even spread puts 20% there), or when samples barely differ from each other.
TOP2_SHARE = 0.6
MIN_RELATIVE_SPREAD = 0.05
# Mean cosine distance between teacher features of samples the teacher puts in one class; near 0
# means copies of one image per class. Measured with the digits_cnn teacher: the real digits test
# images 0.057, 200 copies of one image with 1% noise 0.00001.
MIN_WITHIN_CLASS_DIVERSITY = 0.005
MIN_CLASS_COVERAGE = 0.5  # share of classes with at least one sample, with 5 or more classes
# With this many samples per class expected, a class with none is missing, not unlucky (P ≈ e^-10 or less).
MISSING_CLASS_SAMPLES = 10
# Mean over a teacher's BatchNorm layers of the standardised distance between the samples' statistics and
# the stored ones (dfkt.synthesis.bn_prior). WRN-16-2 on Fashion-MNIST, 256 images: real train and test
# batches 0.25 and 0.41; samples of the runs whose students stayed at 18-29% read 4.7-25.6
# (benchmarks/analysis/batchnorm_pairs.md).
MAX_BN_STATISTICS_GAP = 2.0
# How an RDSKD run turns its BatchNorm prior on: the cpu preset's settings (dfkt.dfkd.rdskd).
RDSKD_PRIOR_ON = "--set params.w_bn=0.3 --set params.bn_distance=standardised, the cpu preset's"


@torch.no_grad()
def feature_diversity(teacher: nn.Module, images: Tensor, predicted: Tensor) -> dict:
    """Inter-sample diversity: the mean pairwise cosine distance (1 - cos) of the teacher's
    penultimate features, within each teacher-predicted class (averaged over classes with two or
    more samples) and across all samples. A teacher that hides its features is read at its logits."""
    try:
        features, source = teacher.forward_features(images), "teacher penultimate features"
    except (AttributeError, DfktError):
        features, source = teacher(images), "teacher logits"
    unit = F.normalize(features.float().flatten(1), dim=1)
    distance = 1 - unit @ unit.t()

    def mean_off_diagonal(d: Tensor) -> float:
        n = d.shape[0]
        return (d.sum() / (n * (n - 1))).item() if n > 1 else float("nan")

    predicted = predicted.to(unit.device)
    within = [
        mean_off_diagonal(distance[predicted == c][:, predicted == c])
        for c in predicted.unique().tolist()
        if int((predicted == c).sum()) > 1
    ]
    return {
        "within_class": sum(within) / len(within) if within else None,
        "across": mean_off_diagonal(distance),
        "features": source,
    }


@torch.no_grad()
def bn_statistics_gap(teacher: nn.Module, images: Tensor) -> float | None:
    """How far ``images`` are from the teacher's training data as its BatchNorm layers remember it: the
    mean over layers of the standardised distance of their statistics (None without such layers)."""
    try:
        prior = BNStatsPrior(teacher, "diagnostics", distance="standardised")
    except ConfigError:
        return None
    try:
        with prior.record():
            teacher(images)
        return torch.stack(list(prior.terms.values())).mean().item()
    finally:
        prior.remove()


def bn_statistics_warning(gap: float | None, method: str, params: BaseModel) -> list[str]:
    """A warning when the samples are far from what the teacher's BatchNorm layers saw in training: the
    teacher's labels on them then teach the student little about real images."""
    if gap is None or gap <= MAX_BN_STATISTICS_GAP:
        return []
    if method == "rdskd" and params.w_bn == 0:  # its paper loss: the prior is there, off
        fix = f"turn RDSKD's BatchNorm prior on ({RDSKD_PRIOR_ON}) or use deepinversion"
    elif method == "rdskd":
        fix = (
            f"give the prior another weight (params.w_bn, now {params.w_bn:g}) or the generator more steps "
            f"(params.gen_epochs, now {params.gen_epochs}; with --max-seconds params.gen_budget_share, now "
            f"{params.gen_budget_share})"
        )
    elif hasattr(params, "w_bn"):
        fix = (
            f"give the prior more weight or time (params.w_bn, now {params.w_bn:g}; more synthesis iterations "
            "or a longer --max-seconds)"
        )
    else:
        # On the WRN-16-2 -> WRN-16-1 pair at 10 minutes (2026-12-05) DeepInversion's and RDSKD's cpu presets
        # reached 77-78% on seed 1; CMI and Fast, which match the statistics through a generator, 13% and 34%.
        fix = (
            "use deepinversion (its cpu preset optimises the images themselves against those statistics) or "
            "rdskd (its cpu preset adds them to its generator's loss on a BatchNorm teacher)"
        )
    return [
        f"samples unlike the teacher's training data: their statistics at its BatchNorm layers are {gap:.1f} "
        f"(standardised, mean over layers) from the stored ones, where real data reads under "
        f"{MAX_BN_STATISTICS_GAP:g}; the student may not carry over to real images; {fix}"
    ]


def collapse_fix(method: str, params: BaseModel, teacher_has_batchnorm: bool = False) -> str:
    """The remedy for ``method``, in terms of the settings it has. "Use rdskd" only to another method on a
    teacher without BatchNorm: on a BatchNorm teacher (WRN-16-2) RDSKD's own loss left classes out too, until
    its generator also matched the teacher's BatchNorm statistics (benchmarks/analysis/batchnorm_pairs.md)."""
    fixes = []
    if method == "rdskd":  # its own loss has no weights to tune; an undertrained generator is the usual cause
        fixes.append(
            f"give the generator more steps (--set params.gen_epochs=..., now {params.gen_epochs}; with "
            f"--max-seconds a larger params.gen_budget_share, now {params.gen_budget_share}) or another "
            f"learning rate (params.gen_lr, now {params.gen_lr:g})"
        )
        # WRN-16-2 pair: without the prior RDSKD's generator never drew a sneaker, whatever its other settings
        if teacher_has_batchnorm and params.w_bn == 0:
            fixes.append(f"on a BatchNorm teacher, match its statistics too ({RDSKD_PRIOR_ON})")
        elif teacher_has_batchnorm:
            fixes.append(
                f"another weight for the BatchNorm prior (params.w_bn, now {params.w_bn:g}), or --method deepinversion "
                "(its cpu preset optimises the images themselves against the teacher's statistics)"
            )
    elif hasattr(params, "gen_lr"):
        fixes.append(f"lower the generator learning rate (--set params.gen_lr=..., now {params.gen_lr:g})")
    if hasattr(params, "w_ie"):
        fixes.append(f"raise the class-diversity weight (params.w_ie, now {params.w_ie:g})")
    if hasattr(params, "synthesis_iterations"):
        fixes.append(f"optimise each batch longer (params.synthesis_iterations, now {params.synthesis_iterations})")
    if getattr(params, "bn_distance", None) == "raw" and getattr(params, "w_bn", 0) > 0 and teacher_has_batchnorm:
        fixes.append(
            "weigh every BatchNorm layer alike (params.bn_distance=standardised; the raw distance is "
            "dominated by the last layer)"
        )
    if method != "rdskd" and not teacher_has_batchnorm:
        fixes.append("or use rdskd, whose loss seeks class and sample diversity without weights to tune")
    elif method not in ("rdskd", "deepinversion") and teacher_has_batchnorm:  # the WRN pair's two working presets
        fixes.append("or use deepinversion, whose cpu preset optimises the images against the teacher's statistics")
    return "; ".join(fixes)


def collapse_warnings(
    images: Tensor,
    histogram: list[int],
    method: str,
    params: BaseModel,
    diversity: dict | None = None,
    teacher_has_batchnorm: bool = False,
) -> list[str]:
    """Warnings for mode collapse: samples concentrated in one or two teacher classes, classes left
    out, or samples nearly identical (in pixels, or in the teacher's features within a class)."""
    warnings = []
    fix = collapse_fix(method, params, teacher_has_batchnorm)
    total = sum(histogram)
    covered = sum(1 for count in histogram if count)
    if len(histogram) >= 5 and total:
        top = [c for c in sorted(range(len(histogram)), key=histogram.__getitem__, reverse=True)[:2] if histogram[c]]
        share = sum(histogram[c] for c in top) / total
        if share >= TOP2_SHARE:
            where = f"class {top[0]}" if len(top) == 1 else f"classes {top[0]} and {top[1]}"
            warnings.append(
                f"mode collapse: {100 * share:.0f}% of {total} generated samples fall in teacher {where}, "
                f"so the student sees little of the others; {fix}"
            )
        elif covered / len(histogram) < MIN_CLASS_COVERAGE:  # spread over a few classes, the rest missing
            warnings.append(
                f"mode collapse: the generated samples cover only {covered} of {len(histogram)} teacher classes; {fix}"
            )
        elif covered < len(histogram) and total >= MISSING_CLASS_SAMPLES * len(histogram):
            missing = ", ".join(str(c) for c, count in enumerate(histogram) if not count)
            warnings.append(
                f"missing classes: none of {total} generated samples falls in teacher class(es) {missing}, so the "
                f"student learns nothing of them; {fix}"
            )
    flat = images.float().flatten(1)
    if flat.shape[0] > 1:
        spread = flat.std(dim=0).mean() / flat.std().clamp_min(1e-12)
        if spread < MIN_RELATIVE_SPREAD:
            warnings.append(
                f"mode collapse: the generated samples are nearly identical (spread across samples "
                f"{spread:.3f} of the pixel spread); {fix}"
            )
    within = (diversity or {}).get("within_class")
    if within is not None and within < MIN_WITHIN_CLASS_DIVERSITY:
        warnings.append(
            f"mode collapse: samples the teacher puts in one class are nearly the same to it (mean "
            f"feature distance {within:.4f}, below {MIN_WITHIN_CLASS_DIVERSITY}); {fix}"
        )
    return warnings
