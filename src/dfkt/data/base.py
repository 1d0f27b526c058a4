"""The in-memory image dataset every loader returns, and the pixel helpers around it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dfkt.errors import ConfigError

# Images per step when converting whole datasets, so float copies stay small.
_CHUNK = 2048


@dataclass(frozen=True)
class ImageData:
    """A labelled train/test image set held as uint8 N×C×H×W tensors.

    ``mean`` and ``std`` are per channel, computed on the train images
    (as stored, i.e. after any padding or resizing) scaled to [0, 1].
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Catch loader bugs here rather than as odd shapes deep inside training.
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(
                    f"{self.name}: {split} images must be uint8 N×C×H×W, got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise ValueError(f"{self.name}: {split} labels must be int64 of length {images.shape[0]}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.channels})")

    @property
    def channels(self) -> int:
        """Number of colour channels (1 or 3)."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        height, width = self.train_images.shape[2:]
        if height != width:
            raise ValueError(f"{self.name}: images are {height}×{width}, not square")
        return int(height)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images of this dataset → float32 standardized with its mean/std."""
        return normalize(images, self.mean, self.std)


def _per_channel(values: tuple[float, ...] | list[float], like: torch.Tensor) -> torch.Tensor:
    """Shape a per-channel tuple so it broadcasts over C×H×W or N×C×H×W."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images → float32 ``(x / 255 - mean) / std``."""
    x = images.to(torch.float32) / 255.0
    return (x - _per_channel(mean, x)) / _per_channel(std, x)


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of :func:`normalize`, as float in [0, 1] (clamped, since generators overshoot)."""
    x = x.to(torch.float32)
    return (x * _per_channel(std, x) + _per_channel(mean, x)).clamp(0.0, 1.0)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 N×C×H×W images scaled to [0, 1]."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    # float64 sums in chunks: exact enough and never a full float copy of the set.
    for start in range(0, images.shape[0], _CHUNK):
        x = images[start : start + _CHUNK].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def fit_size(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Bring square uint8 N×C×H×W images to ``size``×``size``.

    ``mode="pad"`` zero-pads centrally (e.g. 28→32, as LeNet-5 expects);
    ``mode="resize"`` resamples bilinearly with antialiasing and rounds back to uint8.
    """
    height, width = images.shape[2:]
    if height != width:
        raise ValueError(f"fit_size needs square images, got {height}×{width}")
    if size < 1:
        raise ConfigError(f"image_size must be positive, got {size}")
    if size == height:
        return images
    if mode == "pad":
        if size < height:
            raise ConfigError(f"cannot pad {height}×{height} images down to {size}: choose image_size >= {height}")
        before = (size - height) // 2
        after = size - height - before
        return F.pad(images, (before, after, before, after), value=0)
    if mode == "resize":
        chunks = []
        for start in range(0, images.shape[0], _CHUNK):
            x = images[start : start + _CHUNK].to(torch.float32)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            chunks.append(x.round().clamp(0, 255).to(torch.uint8))
        return torch.cat(chunks) if chunks else images.new_zeros((0, images.shape[1], size, size))
    raise ConfigError(f"unknown resize mode {mode!r}: use 'pad' or 'resize'")


def make_image_data(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
) -> ImageData:
    """Build an :class:`ImageData`, computing mean/std from the train images."""
    mean, std = channel_stats(train[0])
    return ImageData(name, train[0], train[1], test[0], test[1], num_classes, mean, std)


def stratified_split(
    name: str, images: np.ndarray, labels: np.ndarray, test_size: float | int, seed: int, size: int
) -> ImageData:
    """A fixed stratified train/test split of N×H×W uint8 ``images`` (scikit-learn's
    ``train_test_split(test_size, stratify=labels, random_state=seed)``), resized to ``size``."""
    from sklearn.model_selection import train_test_split  # slow to import; only these loaders need it

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    images_t, labels_t = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return make_image_data(
        name,
        (fit_size(images_t[train_idx], size, "resize"), labels_t[train_idx]),
        (fit_size(images_t[test_idx], size, "resize"), labels_t[test_idx]),
        num_classes=len(np.unique(labels)),
    )
