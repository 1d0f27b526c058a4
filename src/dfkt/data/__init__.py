"""Datasets as in-memory uint8 tensors, chosen by name through the ``DATASETS`` registry."""

from __future__ import annotations

from pathlib import Path

from dfkt.data import digits, idx, mnist5k, torchvision_sets  # noqa: F401  (importing registers the loaders)
from dfkt.data.base import ImageData, denormalize, fit_size, normalize
from dfkt.data.folder import folder_dataset
from dfkt.data.shifted import load_shifted
from dfkt.registry import DATASETS

__all__ = ["ImageData", "normalize", "denormalize", "fit_size", "load_dataset"]


def load_dataset(
    name: str, root: str | None = None, download: bool = False, image_size: int | None = None
) -> ImageData:
    """Load dataset ``name``, a shifted one (``fmnist-c:rotate:3``) or a folder of labelled images
    (test data only, see ``dfkt.data.folder``); unknown names raise UnknownNameError listing the valid ones."""
    if Path(name).is_dir():
        return folder_dataset(name, image_size)
    if ":" in name:
        return load_shifted(name, lambda base: DATASETS.get(base)(root, download, image_size))
    return DATASETS.get(name)(root, download, image_size)
