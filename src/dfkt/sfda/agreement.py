"""Does the adapted model still agree with its source model beyond chance? A label-free check.

Adaptation starts from the source model and should keep much of what it predicts: even on a large
shift the source's predictions carry the signal that self-training builds on. When the adapted model's
predictions on the target are no more alike the source's than two unrelated predictors with the same
class frequencies would be, adapting threw that signal away: the model collapsed or swapped classes.
A label-free score can miss it; on B4, AaD on gaussian_blur-3 from the shot_lenet source fell from 32% to
13-23% while MixVal rose (benchmarks/results/sfda_agreement_bn_shot_lenet.md: agreement with the source
7-14%, at chance for ten classes).
"""

from __future__ import annotations

from torch import Tensor

# A source that puts most target images in one class gives κ near 0 to any model that does not (p_e is
# then about the observed agreement), however good: no warning from κ when its top class holds more.
# Measured (shot_lenet source, fmnist-c severity 3, AaD `cpu`, seed 1, 2026-12-04): on contrast the source
# put 55% in one class and the adapted model (44% -> 71%) still had κ 0.30; on gaussian_blur (top class
# 48%) the collapse to 6% had κ 0.01 while MixVal rose from 0.27 to 0.43.
CONCENTRATED_SOURCE = 0.7
# κ below this reads as "no more alike than chance"; the lowest agreement of a B4/B5 run that beat its
# source was 26% (AaD, contrast-3, 264 runs with an agreement share).
CHANCE_KAPPA = 0.1


def chance_corrected_agreement(source_classes: Tensor, adapted_classes: Tensor, num_classes: int) -> dict[str, float]:
    """Cohen's κ (Cohen, "A coefficient of agreement for nominal scales", 1960) between two models'
    predicted classes on the same images:

        κ = (p_o − p_e) / (1 − p_e),   p_e = Σ_k p_source(k) · p_adapted(k)

    p_o the share of images on which both predict the same class, p_e the share expected of two
    independent predictors with these class frequencies. κ is 1 for the same predictions, about 0 for
    agreement at chance, negative below it; two models that put every image in one and the same class
    agree fully (κ 1). ``source_top_class`` is the share of images in the source's most predicted class."""
    if len(source_classes) != len(adapted_classes) or len(source_classes) == 0:
        raise ValueError("both models' classes are needed for the same, non-empty set of images")
    observed = (source_classes == adapted_classes).float().mean().item()
    classes = max(num_classes, int(max(source_classes.max(), adapted_classes.max())) + 1)
    p_source = source_classes.bincount(minlength=classes).float() / len(source_classes)
    p_adapted = adapted_classes.bincount(minlength=classes).float() / len(adapted_classes)
    expected = (p_source * p_adapted).sum().item()
    kappa = 1.0 if expected >= 1.0 else (observed - expected) / (1.0 - expected)
    return {"agreement": observed, "chance": expected, "kappa": kappa, "source_top_class": p_source.max().item()}


def agrees_only_by_chance(figures: dict[str, float]) -> bool:
    """Whether :func:`chance_corrected_agreement`'s ``figures`` say a model kept no more of the source's
    predictions than chance (κ < ``CHANCE_KAPPA``), where that can be judged: the source's predictions
    spread over classes (its top class ≤ ``CONCENTRATED_SOURCE`` of the images)."""
    return figures["kappa"] < CHANCE_KAPPA and figures["source_top_class"] <= CONCENTRATED_SOURCE
