"""Label-free checkpoint selection: for data-free distillation and for source-free adaptation.

Distillation: a user without test labels cannot pick the best-on-test student; the teacher is the
only judge there is. At every evaluation the student is scored by its agreement with the teacher (the
share of equal arg-max predictions) on a fixed set of synthetic images it never trains on, and the
most agreeing weights are kept. The best-on-test student stays in reports only as a labelled oracle.

Adaptation: no labels on the target either, and no teacher. At every evaluation (by default each
epoch) the adapted model is scored on the unlabelled target images it adapts on by one of
:data:`TARGET_SCORES` (by default :func:`mixval_score`), the weights with the highest score are kept,
and the source model's own score is the bar an adapted model should clear.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkt.engine import Engine
from dfkt.engine.state import TrainState

VALIDATION_IMAGES = 256


class TeacherAgreementSelection:
    """Keeps, in ``state`` (so the checkpoint carries it), the student weights with the highest
    teacher agreement seen so far on ``held_out(n)``'s images, drawn once when first available."""

    def __init__(
        self,
        state: TrainState,
        student: nn.Module,
        teacher: nn.Module,
        engine: Engine,
        held_out: Callable[[int], Tensor | None],
    ):
        self.state, self.student, self.teacher, self.engine, self.held_out = state, student, teacher, engine, held_out
        state.keep("selected_student", copy.deepcopy(student).requires_grad_(False))
        state.keep("selection.agreement", torch.tensor(-1.0))
        state.keep("selection.updates", torch.tensor(0))
        state.keep("selection.chosen", torch.tensor(-1))  # which update (evaluation) it was chosen at

    @torch.no_grad()
    def _predict(self, model: nn.Module, images: Tensor) -> Tensor:
        with self.engine.eval_mode(model), self.engine.autocast():
            return model(images).argmax(dim=1)

    def _validation(self) -> tuple[Tensor, Tensor] | None:
        buffers = self.state.buffers
        if "selection.images" not in buffers:
            images = self.held_out(VALIDATION_IMAGES)
            if images is None:
                return None
            self.state.keep("selection.images", images.detach().float())
            self.state.keep("selection.teacher", self._predict(self.teacher, buffers["selection.images"]))
        return buffers["selection.images"], buffers["selection.teacher"]

    def update(self) -> float | None:
        """Score the student now; keep it if it agrees best. None while no held-out set exists yet."""
        buffers = self.state.buffers
        buffers["selection.updates"] = buffers["selection.updates"] + 1
        validation = self._validation()
        if validation is None:
            return None
        images, teacher_says = validation
        agreement = (self._predict(self.student, images) == teacher_says).float().mean().item()
        if agreement > buffers["selection.agreement"].item():
            buffers["selection.agreement"] = torch.tensor(agreement)
            buffers["selection.chosen"] = buffers["selection.updates"] - 1
            self.state.modules["selected_student"].load_state_dict(self.student.state_dict())
        return agreement

    @property
    def chosen(self) -> nn.Module | None:
        """The selected student, or None when no evaluation had a held-out set to score on."""
        return self.state.modules["selected_student"] if self.chosen_at is not None else None

    @property
    def chosen_at(self) -> int | None:
        """The index of the evaluation whose weights were kept."""
        index = int(self.state.buffers["selection.chosen"].item())
        return index if index >= 0 else None

    @property
    def agreement(self) -> float | None:
        return self.state.buffers["selection.agreement"].item() if self.chosen_at is not None else None


def information_maximization_score(probs: Tensor) -> float:
    """Label-free score of a classifier's softmax outputs ``probs`` (N×K) on unlabelled target images,
    higher is better, in [0, 1]:

        IM = (H(p̄) − (1/N) Σ_i H(p_i)) / ln K,   p̄ = (1/N) Σ_i p_i,   H(q) = −Σ_c q_c ln q_c.

    The mutual information between an image and its predicted class under the empirical distribution
    (Krause, Perona & Gomes, "Discriminative clustering by regularized information maximization",
    NeurIPS 2010), normalised by its maximum ln K: 1 for confident predictions spread evenly over
    the K classes; near 0 for a model that predicts one class for everything (collapse, H(p̄) → 0) or
    is unsure of everything (H(p_i) → H(p̄)). Its negative is SHOT-IM's loss (Liang et al., ICML 2020);
    as an unsupervised validation criterion for domain adaptation it is the "IM" validator of
    Musgrave, Belongie & Lim, "Benchmarking Validation Methods for Unsupervised Domain Adaptation"
    (arXiv 2208.07360, 2022).

    Why this one rather than soft neighbourhood density (SND; Saito et al., ICCV 2021): SND is highest
    when every prediction is alike, so it rates a collapsed model, the commonest way source-free
    adaptation fails, above a good one; IM rates it near 0. Its blind spot: confident, balanced but
    wrong clusters (e.g. a class permutation) score high, and SHOT/SHOT-IM maximise IM directly, so
    for them it mostly says "confident and balanced", not "correct".
    """
    p = probs.double()
    k = p.shape[1]
    if k < 2 or p.shape[0] == 0:
        raise ValueError(f"the score needs at least 2 classes and 1 image, got probabilities of shape {tuple(p.shape)}")

    def entropy(q: Tensor) -> Tensor:
        return -(q * torch.log(q.clamp_min(1e-12))).sum(dim=-1)

    return float((entropy(p.mean(dim=0)) - entropy(p).mean()) / math.log(k))


CHUNK = 1000  # images per forward pass when scoring
MIXVAL_LAMBDA = 0.55


@torch.no_grad()
def mixval_score(
    predict: Callable[[Tensor], Tensor], images: Tensor, probs: Tensor, lam: float = MIXVAL_LAMBDA
) -> float:
    """Label-free score of a classifier on unlabelled target ``images`` (N×C×H×W), given its softmax
    outputs ``probs`` (N×K) on them and ``predict`` (images -> logits), higher is better, in [0, 1]:
    the inter-cluster MixVal score of Hu, Liang, Liew, Xue, Bai & Wang, "Mixed Samples as Probes for
    Unsupervised Model Selection in Domain Adaptation" (NeurIPS 2023).

    Every image a is paired with one other, b (a fixed shuffled order against its reverse, so each
    image is once a and once b; the authors flip each shuffled batch of 128 instead). With ŷ = argmax p
    and P the pairs,

        MixVal = (1/|P|) Σ_{(a,b)∈P} 1[ŷ_a ≠ ŷ_b] · 1[argmax f(λ·x_a + (1−λ)·x_b) = ŷ_a],   λ = 0.55:

    for pairs across two of the model's clusters, whether the mix keeps the class of the image that
    dominates it (the authors' one-hot pseudo-labels mixed with λ > 1/2). A model whose decision
    boundary runs between its own clusters (the cluster assumption that adaptation relies on) scores
    high; one whose confident clusters cut through the data scores low. Unlike information
    maximisation it is not the quantity SHOT/SHOT-IM maximise, so their later, more confident epochs do
    not win by construction.

    One change from the authors, who average over the cross-cluster pairs only: here the pairs within
    one cluster count as misses (the sum is over all pairs), so a collapsing model scores near 0. Over
    the cross-cluster pairs alone, a model that predicts one class for nearly everything is judged on
    the few images it still puts elsewhere and can outscore a healthy one (0.68 against the source
    model's lower score for a model driven to class 0 in dfkt's tests). With balanced predictions over
    K classes the two differ by a factor of about 1 − 1/K.
    """
    if probs.shape[0] != images.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"need one probability row per image, got {tuple(probs.shape)} for {len(images)} images")
    if not 0.5 < lam < 1:
        raise ValueError(f"lam must be in (0.5, 1) so that the first image dominates the mix, got {lam}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
    a, b = order, order.flip(0)
    pairs = int((a != b).sum())  # an odd count pairs the middle image with itself: no pair
    pseudo = probs.argmax(dim=1).to(images.device)
    inter = pseudo[a] != pseudo[b]
    if not inter.any():
        return 0.0
    a, b = a[inter], b[inter]
    hits = 0
    for start in range(0, len(a), CHUNK):
        ia, ib = a[start : start + CHUNK], b[start : start + CHUNK]
        predicted = predict(lam * images[ia].float() + (1 - lam) * images[ib].float()).argmax(dim=1)
        hits += int((predicted == pseudo[ia]).sum())
    return hits / pairs


@dataclass(frozen=True)
class TargetScore:
    """A label-free score of an adapted model: ``fn(predict, images, probs)``, higher is better."""

    name: str
    criterion: str
    fn: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], float]


TARGET_SCORES = {
    "mixval": TargetScore(
        "MixVal (inter-cluster, over all pairs)",
        "share of pairs of adapted target images (no labels) that the model predicts in different classes and "
        "whose mix 0.55·x_a + 0.45·x_b it assigns to x_a's predicted class; higher is better",
        mixval_score,
    ),
    "im": TargetScore(
        "information maximisation (IM)",
        "IM = (H(mean_i p_i) - mean_i H(p_i)) / ln K of the softmax outputs on the adapted target "
        "images (no labels); higher is better",
        lambda predict, images, probs: information_maximization_score(probs),
    ),
}


class TargetScoreSelection:
    """Keeps, in ``state`` (so the checkpoint carries it), the adapted weights of ``model`` with the
    highest ``score`` (a :class:`TargetScore`) on the unlabelled target ``images`` seen so far;
    ``score(net)`` scores any model (e.g. the source model) the same way."""

    def __init__(self, state: TrainState, model: nn.Module, images: Tensor, engine: Engine, score: TargetScore):
        self.state, self.model, self.images, self.engine, self.target_score = state, model, images, engine, score
        state.keep("selected_model", copy.deepcopy(model).requires_grad_(False))
        state.keep("selection.score", torch.tensor(-1.0, dtype=torch.float64))
        state.keep("selection.updates", torch.tensor(0))
        state.keep("selection.chosen", torch.tensor(-1))  # which update (evaluation) it was chosen at

    @torch.no_grad()
    def score(self, net: nn.Module) -> float:
        """The score of ``net`` in eval mode (BatchNorm running statistics, no dropout) and fp32."""
        with self.engine.eval_mode(net), torch.autocast(self.engine.device.type, enabled=False):

            def predict(images: Tensor) -> Tensor:
                return net(images.float()).float()

            probs = torch.cat(
                [F.softmax(predict(self.images[i : i + CHUNK]), dim=1) for i in range(0, len(self.images), CHUNK)]
            )
            return self.target_score.fn(predict, self.images, probs)

    def update(self) -> float:
        """Score the adapted model now; keep its weights if they score best so far."""
        buffers = self.state.buffers
        buffers["selection.updates"] = buffers["selection.updates"] + 1
        value = self.score(self.model)
        if value > buffers["selection.score"].item():
            buffers["selection.score"] = torch.tensor(value, dtype=torch.float64)
            buffers["selection.chosen"] = buffers["selection.updates"] - 1
            self.state.modules["selected_model"].load_state_dict(self.model.state_dict())
        return value

    @property
    def chosen_at(self) -> int | None:
        """The index of the evaluation whose weights were kept (None before any evaluation)."""
        index = int(self.state.buffers["selection.chosen"].item())
        return index if index >= 0 else None

    @property
    def chosen(self) -> nn.Module | None:
        return self.state.modules["selected_model"] if self.chosen_at is not None else None

    @property
    def best_score(self) -> float | None:
        return self.state.buffers["selection.score"].item() if self.chosen_at is not None else None
