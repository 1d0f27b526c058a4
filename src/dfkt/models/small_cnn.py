"""A small CNN for the 8x8 scikit-learn digits, fast enough for tests and CPU demos.

Three conv-BN-ReLU layers (one 2x max-pool), then a flatten that keeps the spatial layout:
a teacher that pools globally ignores where strokes are, and images inverted from such a
teacher transfer worse to a student. BatchNorm lets BN-statistics methods use it.
The features are the output of a hidden fc layer; the head is one linear layer.
"""

from __future__ import annotations

from torch import nn

from dfkt.models.base import Classifier, check_image_size
from dfkt.registry import MODELS


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _digits_cnn(name: str, width: int, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    check_image_size(name, image_size, 8)
    hidden = 4 * width
    backbone = nn.Sequential(
        *_conv_bn_relu(in_channels, width),
        *_conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),
        *_conv_bn_relu(2 * width, 2 * width),
        nn.Flatten(),
        nn.Linear(2 * width * (image_size // 2) ** 2, hidden),
        nn.ReLU(inplace=True),
    )
    return Classifier(
        backbone,
        nn.Linear(hidden, num_classes),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        feature_dim=hidden,
    )


@MODELS.register("digits_cnn")
def digits_cnn(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _digits_cnn("digits_cnn", 32, num_classes, in_channels, image_size)


@MODELS.register("digits_cnn_half")
def digits_cnn_half(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _digits_cnn("digits_cnn_half", 16, num_classes, in_channels, image_size)
