"""LeNet-5 (LeCun et al., 1998) in the variant used by the DAFL and RDSKD code.

The features are the 120-d output of the third convolution, as in DAFL, whose
activation loss is computed on them; the head is fc 120->84->K.
"""

from __future__ import annotations

from torch import nn

from dfkt.errors import ConfigError
from dfkt.models.base import Classifier
from dfkt.registry import MODELS


def _lenet(
    name: str, widths: tuple[int, int, int], hidden: int, num_classes: int, in_channels: int, image_size: int
) -> Classifier:
    if image_size != 32:
        raise ConfigError(f"{name} needs image_size 32, got {image_size}; pad 28x28 data to 32x32")
    c1, c2, c3 = widths
    backbone = nn.Sequential(
        nn.Conv2d(in_channels, c1, 5),  # 32 -> 28
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # -> 14
        nn.Conv2d(c1, c2, 5),  # -> 10
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # -> 5
        nn.Conv2d(c2, c3, 5),  # -> 1
        nn.ReLU(inplace=True),
        nn.Flatten(),
    )
    head = nn.Sequential(nn.Linear(c3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    return Classifier(
        backbone, head, num_classes=num_classes, in_channels=in_channels, image_size=image_size, feature_dim=c3
    )


@MODELS.register("lenet5")
def lenet5(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _lenet("lenet5", (6, 16, 120), 84, num_classes, in_channels, image_size)


@MODELS.register("lenet5_half")
def lenet5_half(num_classes: int, in_channels: int, image_size: int) -> Classifier:
    return _lenet("lenet5_half", (3, 8, 60), 42, num_classes, in_channels, image_size)
