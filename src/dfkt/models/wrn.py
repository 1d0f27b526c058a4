"""Wide ResNet (Zagoruyko & Komodakis, 2016, "Wide Residual Networks").

WRN-d-k has (d-4)/6 pre-activation blocks (BN-ReLU-conv) in each of three groups of
widths 16k, 32k, 64k after a 16-channel stem, then BN-ReLU, global average pooling
and a linear layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dfkt.errors import ConfigError
from dfkt.models.base import Classifier, check_image_size, kaiming_init
from dfkt.registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        # A projection shortcut reads the pre-activated input, as in the original code.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(
    depth: int, widen: int, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0
) -> Classifier:
    """Build WRN-``depth``-``widen``."""
    name = f"wrn{depth}_{widen}"
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ConfigError(f"{name}: depth must be 6n+4 with n >= 1, got {depth}; use e.g. 16, 28 or 40")
    check_image_size(name, image_size, 4)  # two stride-2 groups
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False))
    in_planes = 16
    for i, planes in enumerate(widths):
        group = []
        for j in range(n):
            group.append(PreActBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, dropout))
            in_planes = planes
        layers[f"group{i + 1}"] = nn.Sequential(*group)
    layers["bn"] = nn.BatchNorm2d(in_planes)
    layers["relu"] = nn.ReLU(inplace=True)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    backbone = kaiming_init(nn.Sequential(layers))
    head = nn.Linear(in_planes, num_classes)
    nn.init.zeros_(head.bias)
    return Classifier(
        backbone, head, num_classes=num_classes, in_channels=in_channels, image_size=image_size, feature_dim=in_planes
    )


@MODELS.register("wrn16_1")
def wrn16_1(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return wide_resnet(16, 1, num_classes, in_channels, image_size)


@MODELS.register("wrn16_2")
def wrn16_2(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return wide_resnet(16, 2, num_classes, in_channels, image_size)


@MODELS.register("wrn40_2")
def wrn40_2(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return wide_resnet(40, 2, num_classes, in_channels, image_size)
