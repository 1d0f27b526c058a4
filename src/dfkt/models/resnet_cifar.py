"""CIFAR-style ResNet (He et al., 2016, "Deep Residual Learning for Image Recognition").

Unlike the ImageNet version the stem is a single 3x3 stride-1 convolution with no
max-pool, so 32x32 inputs keep enough resolution; four stages of BasicBlocks
(64/128/256/512 channels) end in global average pooling and a linear layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dfkt.models.base import Classifier, check_image_size, kaiming_init
from dfkt.registry import MODELS


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet(name: str, blocks: tuple[int, ...], num_classes: int, in_channels: int, image_size: int) -> Classifier:
    check_image_size(name, image_size, 8)  # three stride-2 stages
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
    )
    in_planes = 64
    for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        stage = []
        for j in range(count):
            stride = 2 if i > 0 and j == 0 else 1
            stage.append(BasicBlock(in_planes, planes, stride))
            in_planes = planes
        layers[f"layer{i + 1}"] = nn.Sequential(*stage)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    backbone = kaiming_init(nn.Sequential(layers))
    return Classifier(
        backbone,
        nn.Linear(512, num_classes),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        feature_dim=512,
    )


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _resnet("resnet18", (2, 2, 2, 2), num_classes, in_channels, image_size)


@MODELS.register("resnet34")
def resnet34(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _resnet("resnet34", (3, 4, 6, 3), num_classes, in_channels, image_size)
