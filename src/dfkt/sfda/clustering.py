"""SHOT's self-supervised pseudo-labels (Liang et al., ICML 2020), as in the authors' code.

Features get a constant 1 appended and are L2-normalised. Soft centroids
c_k = Σ_i p_ik f_i / Σ_i p_ik are weighted by the predictions; each sample takes the label of
its nearest centroid by cosine distance; hard centroids of those labels are computed and the
samples reassigned (``rounds`` times). Only classes the model predicts for some sample
(its argmax) can be assigned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _nearest(features: Tensor, centroids: Tensor, allowed: Tensor) -> Tensor:
    similarity = features @ F.normalize(centroids, dim=1).t()  # cosine distance = 1 − similarity
    return similarity.masked_fill(~allowed, -float("inf")).argmax(dim=1)


def shot_pseudo_labels(features: Tensor, probs: Tensor, rounds: int = 1) -> Tensor:
    f = F.normalize(torch.cat([features.float(), torch.ones_like(features[:, :1]).float()], dim=1), dim=1)
    p = probs.float()
    allowed = torch.bincount(p.argmax(dim=1), minlength=p.shape[1]) > 0
    labels = _nearest(f, p.t() @ f / (p.sum(dim=0)[:, None] + 1e-8), allowed)
    for _ in range(rounds):
        onehot = F.one_hot(labels, p.shape[1]).float()
        labels = _nearest(f, onehot.t() @ f / (onehot.sum(dim=0)[:, None] + 1e-8), allowed)
    return labels
