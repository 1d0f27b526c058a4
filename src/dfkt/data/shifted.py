"""Shifted datasets named ``<dataset>-c:<corruption>:<severity>``, e.g. ``fmnist-c:rotate:3``.

Both splits of the base dataset under one corruption (dfkt.data.corruptions), each split with its
own fixed seed, so a target domain is the same on every machine. Mean/std stay the base
dataset's: a source model normalises target images as it did its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from dfkt.data.base import ImageData
from dfkt.data.corruptions import CORRUPTIONS, corrupt, corruption_name
from dfkt.errors import ConfigError

FORMAT = "<dataset>-c:<corruption>:<severity 1-5>, e.g. fmnist-c:rotate:3"


def parse_shift(name: str) -> tuple[str, str, int]:
    """``"fmnist-c:rotate:3"`` -> ``("fmnist", "rotate", 3)``."""
    parts = name.split(":")
    if len(parts) != 3 or not parts[0].endswith("-c") or not parts[2].isdigit():
        raise ConfigError(f"cannot read the shifted dataset {name!r}; write {FORMAT} "
                          f"(corruptions: {', '.join(CORRUPTIONS)})")
    return parts[0][:-2], corruption_name(parts[1]), int(parts[2])


def load_shifted(name: str, load_base: Callable[[str], ImageData]) -> ImageData:
    base_name, corruption, severity = parse_shift(name)
    base = load_base(base_name)
    return replace(base, name=f"{base_name}-c:{corruption}:{severity}",
                   train_images=corrupt(base.train_images, corruption, severity, seed=1),
                   test_images=corrupt(base.test_images, corruption, severity, seed=2))
