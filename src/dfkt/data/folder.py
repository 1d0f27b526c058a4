"""A user's own images: a folder of image files, as an adaptation target or as test data.

Files directly in the folder are unlabelled. Files in subfolders named by class index
(``0/``, ``1/``, ...) carry that label, used only for scoring. Images must share one size
and channel count; ``image_size`` resizes them explicitly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dfkt.data.base import ImageData, fit_size
from dfkt.errors import ConfigError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _image_files(folder: Path) -> list[tuple[Path, int]]:
    files = [(p, -1) for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not sub.name.isdigit():
            raise ConfigError(f"{sub}: class subfolders must be named by class index (0, 1, ...); move or rename it")
        files += [(p, int(sub.name)) for p in sorted(sub.iterdir()) if p.suffix.lower() in SUFFIXES]
    return files


def load_image_folder(
    folder: str | Path, channels: int | None, image_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 N×C×H×W images read as ``channels`` (1: grey, 3: RGB; None: as the first image is),
    and labels (None if any is missing)."""
    folder = Path(folder)
    files = _image_files(folder)
    if not files:
        raise ConfigError(
            f"image folder {folder} holds no images ({', '.join(sorted(SUFFIXES))}, directly or in "
            "class-index subfolders); put the images there"
        )
    if channels is None:
        with Image.open(files[0][0]) as first:
            channels = 1 if first.mode in ("1", "L", "I", "F") else 3
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ConfigError(f"image folders can feed 1- or 3-channel models, not {channels}-channel ones")
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as opened:
                pixels = np.asarray(opened.convert(mode), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read {path} as an image ({exc}); remove or replace it") from None
        image = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).copy()).permute(2, 0, 1)
        if image_size is not None:
            image = fit_size(image[None], image_size, "resize")[0]
        images.append(image)
    sizes = {tuple(x.shape[1:]) for x in images}
    if len(sizes) > 1:
        raise ConfigError(
            f"the images in {folder} differ in size ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}); "
            "pass --set target.image_size=N to resize them all"
        )
    height, width = sizes.pop()
    if height != width:
        raise ConfigError(
            f"the images in {folder} are {height}x{width}; models take square images: pass "
            "--set target.image_size=N to resize them"
        )
    labels = torch.tensor([label for _, label in files])
    return torch.stack(images), None if (labels < 0).any() else labels


def folder_dataset(folder: str | Path, image_size: int | None = None) -> ImageData:
    """A labelled folder as test data (its train split is the same images, for the shape only)."""
    images, labels = load_image_folder(folder, None, image_size)
    if labels is None:
        raise ConfigError(f"test data needs labels: put the images of {folder} in class-index subfolders (0/, 1/, ...)")
    x = images.float() / 255.0
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return ImageData(
        str(folder), images, labels, images, labels, int(labels.max()) + 1, tuple(mean.tolist()), tuple(std.tolist())
    )
