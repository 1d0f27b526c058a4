"""Loss functions: pure, stateless, computed in float32 whatever the autocast dtype."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: Literal["batchmean", "mean"] = "batchmean",
) -> Tensor:
    """Knowledge distillation (Hinton et al., 2015).

    τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), averaged over the batch ("batchmean"), or with "mean" over the
    batch and the K classes (torch's elementwise mean, 1/K of the KL: what ZSKT's authors' code computes).
    The τ² factor keeps gradient magnitudes comparable across temperatures.
    """
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    if reduction == "mean":  # written out: torch warns its "mean" may come to mean "batchmean"
        kl = kl / s.shape[1]
    return kl * temperature**2


def leading_channel_loss(
    student_features: list[Tensor], teacher_features: list[Tensor], channels: list[Tensor | None] | None = None
) -> Tensor:
    """Relative squared error between each student layer's output and the teacher's leading channels
    of the same layer, averaged over layers:

        L_feat = (1/|L|) Σ_l ‖s_l − t_l[:, :c_l]‖² / ‖t_l[:, :c_l]‖²,

    c_l the student's channel count at layer l; with ``channels``, t_l[:, channels[l]] (the teacher's channels the
    student's were sliced from; None: leading). A hint loss (FitNets, Romero et al. ICLR 2015) without
    FitNets' regressor: a student sliced from its teacher (dfkt.models.slicing) already computes, channel
    for channel, an approximation of the teacher's leading channels, and this keeps it so while it learns
    the teacher's outputs on synthetic images. Dividing by the teacher's energy weighs every layer alike."""
    terms = []
    for s, t, kept in zip(student_features, teacher_features, channels or [None] * len(student_features), strict=True):
        target = (t[:, : s.shape[1]] if kept is None else t[:, kept]).float()
        terms.append((s.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def l2_sp(weights: list[Tensor], start: list[Tensor]) -> Tensor:
    """L2-SP (Li, Grandvalet & Davis, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
    ICML 2018): the squared distance of the weights from where they started,

        Ω(θ) = Σ_i ‖θ_i − θ⁰_i‖².

    Weight decay pulls towards zero; this pulls towards θ⁰, which for a student sliced from its teacher holds
    filters learned on real images that a student trained only on synthetic images would otherwise overwrite."""
    return torch.stack([(w.float() - w0.float()).pow(2).sum() for w, w0 in zip(weights, start, strict=True)]).sum()


def kl_per_sample(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) of each sample, shape (N,): how far the student is from the
    teacher on it (used to mine samples the student has yet to learn)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (t.exp() * (t - s)).sum(dim=1)


def one_hot_loss(logits: Tensor) -> Tensor:
    """Authenticity / one-hot loss (DAFL, Chen et al. ICCV 2019; RDSKD).

    L_oh = mean_i CE(o_i, argmax o_i): low when the teacher is confident on each sample.
    """
    logits = logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1))


def class_balance_loss(logits: Tensor, log_base: float = math.e) -> Tensor:
    """Class-diversity / information-entropy loss (DAFL; RDSKD).

    L_ie = Σ_c p̄_c log p̄_c = −H(p̄), with p̄ the batch mean of softmax(o).
    Minimal (−log K) when the batch covers all K classes evenly. DAFL uses log₁₀,
    RDSKD the natural log.
    """
    mean_prob = F.softmax(logits.float(), dim=1).mean(dim=0)
    return (mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum() / math.log(log_base)


def pairwise_diversity_loss(images: Tensor, logits: Tensor, eps: float = 1e-20) -> Tensor:
    """Inter-sample diversity loss of RDSKD (Han et al., ICASSP 2021).

    The batch is split into halves (x₁, x₂), sample i of one paired with sample i of the
    other: l = ‖x₂ − x₁‖_F / ‖p(o₂) − p(o₁)‖_F and L_ds = 1 / (l + eps). Small when images
    differ a lot for a given change of the teacher's prediction.
    """
    half = images.shape[0] // 2
    if half == 0:
        raise ValueError("pairwise_diversity_loss needs a batch of at least 2")
    x = images.float()
    p = F.softmax(logits.float(), dim=1)
    image_gap = torch.linalg.vector_norm(x[half : 2 * half] - x[:half])
    prob_gap = torch.linalg.vector_norm(p[half : 2 * half] - p[:half])
    # Equal to 1 / (image_gap / prob_gap + eps), written so the gradient stays finite as prob_gap -> 0.
    return prob_gap / (image_gap + eps * prob_gap)


def exp_penalty(loss: Tensor, reference: Tensor | float, max_exponent: float) -> tuple[Tensor, Tensor]:
    """Exponential penalty on a loss increment (RDSKD): exp(L − r), r detached.

    Its gradient exp(L − r)·∇L weights a term up exponentially when it rises above its
    reference. For RDSKD's terms the exponent stays below ln K (L_oh ∈ [0, ln K] with r ≥ 0;
    L_ie ∈ [−ln K, 0] with r ≥ −ln K); the clamp at ``max_exponent`` is a guard for other
    uses, and the second value (a bool tensor, so no device sync per step) says whether it was hit.
    """
    exponent = loss - (reference.detach() if isinstance(reference, Tensor) else reference)
    clamped = exponent.detach() > max_exponent
    return torch.exp(exponent.clamp(max=max_exponent)), clamped


def activation_loss(features: Tensor) -> Tensor:
    """Activation loss of DAFL (Chen et al., ICCV 2019): L_a = −mean |f_T(x)|.

    Rewards images that excite the teacher's penultimate features strongly, as real data does.
    """
    return -features.float().abs().mean()


def mode_seeking_loss(images: Tensor, z: Tensor, eps: float = 1e-5) -> Tensor:
    """Mode-seeking regulariser of MSGAN (Mao et al., CVPR 2019), used for MSKD.

    With the batch split in halves: L_ms = 1 / (mean|G(z₂) − G(z₁)| / mean|z₂ − z₁| + eps).
    Small when different noise gives different images.
    """
    half = images.shape[0] // 2
    if half == 0:
        raise ValueError("mode_seeking_loss needs a batch of at least 2")
    x, z = images.float(), z.float()
    ratio = (x[half : 2 * half] - x[:half]).abs().mean() / (z[half : 2 * half] - z[:half]).abs().mean()
    return 1.0 / (ratio + eps)


def logit_l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Teacher–student discrepancy of DFAD (Fang et al., 2019): mean |t − s| over logits.

    The student minimises it; the generator maximises it.
    """
    return (teacher_logits.float() - student_logits.float()).abs().mean()


def attention_map(features: Tensor) -> Tensor:
    """Spatial attention (Zagoruyko & Komodakis, ICLR 2017): a(f) = normalise(mean_c f²), flattened."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
    """Attention transfer as in ZSKT (Micaelli & Storkey, NeurIPS 2019): Σ_blocks mean (a(f_S) − a(f_T))²."""
    return sum(
        (attention_map(s) - attention_map(t)).pow(2).mean()
        for s, t in zip(student_features, teacher_features, strict=True)
    )  # type: ignore[return-value]


def total_variation(images: Tensor) -> Tensor:
    """Smoothness prior of DeepInversion (Yin et al., CVPR 2020), as in the authors' CIFAR code: the sum
    of the L2 norms of the horizontal, vertical and both diagonal neighbour differences,
    TV(x) = ‖Δ_h x‖₂ + ‖Δ_v x‖₂ + ‖Δ_↘ x‖₂ + ‖Δ_↗ x‖₂."""
    x = images.float()
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    return sum(torch.linalg.vector_norm(d) for d in diffs)  # type: ignore[return-value]


def js_divergence(logits_p: Tensor, logits_q: Tensor, temperature: float = 1.0) -> Tensor:
    """Jensen–Shannon divergence between softmax(p/τ) and softmax(q/τ), batch mean (natural log).

    JS(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M) with M = ½ (P + Q); it lies in [0, ln 2].
    """
    p = F.softmax(logits_p.float() / temperature, dim=1)
    q = F.softmax(logits_q.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.log())).sum(dim=1)  # noqa: E731
    return (0.5 * kl(p) + 0.5 * kl(q)).mean()


def competition_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """Adaptive DeepInversion's competition term (Yin et al., CVPR 2020): 1 − JS(S(x)/τ, T(x)/τ), τ = 3.

    Low when teacher and student disagree, so inverted images move to where the student is wrong.
    """
    return 1.0 - js_divergence(student_logits, teacher_logits, temperature)


def adversarial_kl_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Adversarial term of CMI (Fang et al., IJCAI 2021) and Fast (AAAI 2022):
    L_adv = −mean_i 1[argmax S_i = argmax T_i] · KL(T_i ‖ S_i).

    Pushes samples the student already agrees on towards where it diverges; samples it gets
    wrong are left alone so the images do not drift off the teacher's classes.
    """
    t = F.log_softmax(teacher_logits.float(), dim=1)
    s = F.log_softmax(student_logits.float(), dim=1)
    kl = (t.exp() * (t - s)).sum(dim=1)
    agree = (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float()
    return -(agree * kl).mean()


def soft_cross_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy with soft targets, −mean_i Σ_c y_ic log softmax(o_i/τ)_c (ZSKD uses τ = 20)."""
    return -(targets.float() * F.log_softmax(logits.float() / temperature, dim=1)).sum(dim=1).mean()


def info_nce(anchors: Tensor, positives: Tensor, negatives: Tensor, temperature: float = 0.1) -> Tensor:
    """InfoNCE (van den Oord et al., 2018) as CMI's contrastive term: each anchor must pick its own
    positive among the positives of the batch and the extra ``negatives`` (a memory bank), by cosine
    similarity / τ. −mean_i log exp(a_i·p_i/τ) / Σ_j exp(a_i·k_j/τ)."""
    a = F.normalize(anchors.float(), dim=1)
    keys = F.normalize(torch.cat([positives.float(), negatives.float()]), dim=1)
    logits = a @ keys.t() / temperature
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


# -- source-free domain adaptation -----------------------------------------------------------------
def entropy(logits: Tensor) -> Tensor:
    """Mean prediction entropy, mean_i H(p_i) with H(q) = −Σ_c q_c ln q_c (Tent, Wang et al., ICLR 2021)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def information_maximization_loss(logits: Tensor) -> Tensor:
    """SHOT-IM (Liang et al., ICML 2020): mean_i H(p_i) − H(p̄).

    Confident predictions per sample, spread over the classes across the batch.
    """
    mean_prob = F.softmax(logits.float(), dim=1).mean(dim=0)
    return entropy(logits) + (mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum()


def neighbour_affinity_loss(probs: Tensor, neighbour_scores: Tensor, weights: Tensor | float = 1.0) -> Tensor:
    """Attraction to neighbours (NRC, Yang et al. NeurIPS 2021; AaD, NeurIPS 2022):
    −mean_i Σ_k A_ik · S_kᵀ p_i, with S_k the stored softmax scores of sample i's K neighbours
    (shape N×K×C) and A_ik their affinities (1, or NRC's reciprocal weighting)."""
    dots = torch.einsum("nkc,nc->nk", neighbour_scores.float(), probs.float())
    return -(dots * weights).sum(dim=1).mean()


def dispersion_loss(probs: Tensor) -> Tensor:
    """AaD's dispersion term: mean_i Σ_{j≠i} p_iᵀ p_j over the batch (small when predictions differ)."""
    p = probs.float()
    gram = p @ p.t()
    return (gram.sum() - gram.diagonal().sum()) / p.shape[0]
