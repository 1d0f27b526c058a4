"""Shifted datasets named ``<dataset>-c:<corruption>:<severity>[:<scale>]``, e.g. ``fmnist-c:rotate:3``.

Both splits of the base dataset under one corruption (dfkt.data.corruptions), each split with its
own fixed seed, so a target domain is the same on every machine. The scale is MNIST-C's unless the
name ends in another (``fmnist-c:rotate:3:dfkt``, the project's earlier scale). Mean/std stay the
base dataset's: a source model normalises target images as it did its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch

from dfkt.data.base import ImageData
from dfkt.data.corruptions import CORRUPTIONS, DEFAULT_SCALE, SCALES, corrupt, corruption_name, scale_name
from dfkt.errors import ConfigError

FORMAT = "<dataset>-c:<corruption>:<severity 1-5>[:<scale>], e.g. fmnist-c:rotate:3"


class Shift(NamedTuple):
    base: str
    corruption: str
    severity: int
    scale: str = DEFAULT_SCALE

    @property
    def name(self) -> str:
        """The canonical name: the default scale unwritten."""
        suffix = "" if self.scale == DEFAULT_SCALE else f":{self.scale}"
        return f"{self.base}-c:{self.corruption}:{self.severity}{suffix}"

    def apply(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        return corrupt(images, self.corruption, self.severity, seed=seed, scale=self.scale)


def parse_shift(name: str) -> Shift:
    """``"fmnist-c:rotate:3"`` -> ``Shift("fmnist", "rotate", 3, "mnist-c")``."""
    parts = name.split(":")
    if len(parts) not in (3, 4) or not parts[0].endswith("-c") or not parts[2].isdigit():
        raise ConfigError(
            f"cannot read the shifted dataset {name!r}; write {FORMAT} "
            f"(corruptions: {', '.join(CORRUPTIONS)}; scales: {', '.join(SCALES)}, "
            f"default {DEFAULT_SCALE})"
        )
    scale = scale_name(parts[3]) if len(parts) == 4 else DEFAULT_SCALE
    return Shift(parts[0][:-2], corruption_name(parts[1]), int(parts[2]), scale)


def load_shifted(name: str, load_base: Callable[[str], ImageData]) -> ImageData:
    shift = parse_shift(name)
    base = load_base(shift.base)
    return replace(
        base,
        name=shift.name,
        train_images=shift.apply(base.train_images, seed=1),
        test_images=shift.apply(base.test_images, seed=2),
    )
