"""Classifiers and generators, chosen by name through the MODELS and GENERATORS registries."""

from __future__ import annotations

from torch import nn

# Imported for their registration side effects.
from dfkt.models import generator, lenet, resnet_cifar, shot, small_cnn, wrn  # noqa: F401
from dfkt.models.base import Classifier
from dfkt.models.generator import DAFLGenerator
from dfkt.registry import GENERATORS, MODELS

__all__ = ["Classifier", "DAFLGenerator", "build_generator", "build_model"]


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """Build the registered classifier ``name``; unknown names raise UnknownNameError."""
    return MODELS.get(name)(num_classes, in_channels, image_size)


def build_generator(name: str, nz: int, out_channels: int, image_size: int, **options) -> nn.Module:
    """Build the registered generator ``name`` (options: ``width``, ``output``, ``mean``, ``std``, ``smoothing``; see
    dfkt.models.generator); unknown names raise UnknownNameError."""
    return GENERATORS.get(name)(nz, out_channels, image_size, **options)
