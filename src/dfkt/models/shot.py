"""Source models in the shape SHOT (Liang et al., ICML 2020) and its successors adapt.

A feature extractor, a bottleneck (Linear -> 256, BatchNorm1d, Dropout 0.5) and a
weight-normalised linear head. ``forward_features`` returns the bottleneck output, which
SHOT clusters and NRC/AaD keep in their memory banks; SHOT freezes ``head`` while adapting.
``backbone.extractor`` is what adaptation's param groups call the backbone, the rest of
``backbone`` (``bottleneck``, ``bn``, ``dropout``) the bottleneck, and ``head`` the head.
Extractors: SHOT's digit LeNet and DTN, and the CIFAR ResNets.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dfkt.models.base import Classifier, check_image_size
from dfkt.models.resnet_cifar import resnet18, resnet34
from dfkt.registry import MODELS

BOTTLENECK = 256


def _lenet_extractor(in_channels: int) -> nn.Module:
    """SHOT's digit LeNet: conv5 -> 20, pool, ReLU, conv5 -> 50, Dropout2d 0.5, pool, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5),
        nn.MaxPool2d(2),
        nn.ReLU(inplace=True),
        nn.Conv2d(20, 50, 5),
        nn.Dropout2d(0.5),
        nn.MaxPool2d(2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
    )


def _dtn_extractor(in_channels: int) -> nn.Module:
    """SHOT's DTN: three stride-2 conv5 layers (64, 128, 256) with BatchNorm, Dropout2d, ReLU."""
    layers: list[nn.Module] = []
    for cin, cout, drop in ((in_channels, 64, 0.1), (64, 128, 0.3), (128, 256, 0.5)):
        layers += [nn.Conv2d(cin, cout, 5, 2, 2), nn.BatchNorm2d(cout), nn.Dropout2d(drop), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Flatten())


def _shot(extractor: nn.Module, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    with torch.no_grad():
        extractor_dim = extractor.eval()(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
    extractor.train()
    backbone = nn.Sequential(
        OrderedDict(
            extractor=extractor,
            bottleneck=nn.Linear(extractor_dim, BOTTLENECK),
            bn=nn.BatchNorm1d(BOTTLENECK),
            dropout=nn.Dropout(0.5),
        )
    )
    head = weight_norm(nn.Linear(BOTTLENECK, num_classes))
    return Classifier(
        backbone, head, num_classes=num_classes, in_channels=in_channels, image_size=image_size, feature_dim=BOTTLENECK
    )


@MODELS.register("shot_lenet")
def shot_lenet(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    check_image_size("shot_lenet", image_size, 16)
    return _shot(_lenet_extractor(in_channels), num_classes, in_channels, image_size)


@MODELS.register("shot_dtn")
def shot_dtn(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    check_image_size("shot_dtn", image_size, 8)
    return _shot(_dtn_extractor(in_channels), num_classes, in_channels, image_size)


@MODELS.register("shot_resnet18")
def shot_resnet18(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _shot(resnet18(num_classes, in_channels, image_size).backbone, num_classes, in_channels, image_size)


@MODELS.register("shot_resnet34")
def shot_resnet34(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _shot(resnet34(num_classes, in_channels, image_size).backbone, num_classes, in_channels, image_size)
