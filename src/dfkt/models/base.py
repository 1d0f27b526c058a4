"""The classifier contract shared by every model: a feature backbone followed by a head."""

from __future__ import annotations

import torch
from torch import nn

from dfkt.errors import ConfigError


def check_image_size(model: str, image_size: int, minimum: int) -> None:
    """Raise ConfigError when ``image_size`` is too small for ``model``."""
    if image_size < minimum:
        raise ConfigError(
            f"{model} needs image_size >= {minimum}, got {image_size}; resize the data or pick another model"
        )


def kaiming_init(backbone: nn.Module) -> nn.Module:
    """He initialisation (fan-out) of every conv, as in the ResNet and WRN papers' code."""
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return backbone


class Classifier(nn.Module):
    """An image classifier split into ``backbone`` (images -> features) and ``head`` (features -> logits).

    ``forward_features`` gives the (N, feature_dim) features that feature-based losses use,
    ``classify`` maps features to logits, and ``forward`` chains the two. Source-free
    adaptation methods train or freeze ``backbone`` and ``head`` separately.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        feature_dim: int,
    ):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}; fix the dataset's class count")
        if in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {in_channels}; fix the dataset's channel count")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))
