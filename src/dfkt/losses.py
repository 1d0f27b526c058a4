"""Loss functions: pure, stateless, computed in float32 whatever the autocast dtype."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Knowledge distillation (Hinton et al., 2015).

    τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), averaged over the batch ("batchmean").
    The τ² factor keeps gradient magnitudes comparable across temperatures.
    """
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    return kl * temperature**2


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
