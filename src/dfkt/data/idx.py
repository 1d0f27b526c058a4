"""IDX file parsing and the Fashion-MNIST loader that reads the Debian package's files."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from dfkt.data.base import ImageData, fit_size, make_image_data
from dfkt.errors import DatasetUnavailableError
from dfkt.registry import DATASETS

# IDX type codes (third magic byte) → big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FMNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """Decode the bytes of one IDX file into an array of its declared shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetUnavailableError(f"{source} is not an IDX file (bad magic number): delete it and fetch it again")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetUnavailableError(f"{source} is truncated (incomplete header): delete it and fetch it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetUnavailableError(
            f"{source} is truncated or corrupt ({len(raw) - header} data bytes, expected {expected}): "
            "delete it and fetch it again"
        )
    # astype copies into native byte order, so the result is writable and torch-compatible.
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed if its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        # A cut-off download shows up here as EOFError or a gzip error.
        raise DatasetUnavailableError(f"{path} is truncated or corrupt ({exc}): delete it and fetch it again") from None
    return parse_idx(raw, str(path))


def _find(root: Path, stem: str) -> Path | None:
    """The ``.gz`` file for ``stem`` if present, else the uncompressed one, else None."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _fmnist_root(root: str | None) -> Path:
    return Path(root or os.environ.get("DFKT_FMNIST_ROOT") or FMNIST_DEFAULT_ROOT).expanduser()


def _read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 N×1×H×W and labels as int64, checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetUnavailableError(f"{images_path} does not hold uint8 N×H×W images: delete it and fetch it again")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetUnavailableError(f"{labels_path} does not hold one label per image of {images_path.name}")
    if labels.size and labels.max() > 9:
        raise DatasetUnavailableError(f"{labels_path} holds labels above 9: delete it and fetch it again")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


@DATASETS.register("fmnist")
def load_fmnist(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """Fashion-MNIST (60,000 train / 10,000 test, 10 classes) from its four IDX files.

    Looks in ``root``, else ``$DFKT_FMNIST_ROOT``, else the Debian package's folder
    ``/usr/share/datasets/fashion-mnist``. ``download`` is ignored: the files come from
    ``apt-get install -y dataset-fashion-mnist``. Default size 32 (28 zero-padded, for LeNet-5);
    ``image_size=28`` keeps the native size, smaller sizes are resized.
    """
    folder = _fmnist_root(root)
    paths = [_find(folder, stem) for stem in FMNIST_FILES]
    if any(p is None for p in paths):
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found in {folder}: install it with 'apt-get install -y dataset-fashion-mnist' "
            f"or pass --data-root DIR containing {', '.join(f'{s}.gz' for s in FMNIST_FILES)}"
        )
    train_images, train_labels = _read_split(paths[0], paths[1])
    test_images, test_labels = _read_split(paths[2], paths[3])
    size = 32 if image_size is None else image_size
    mode = "pad" if size >= train_images.shape[-1] else "resize"
    return make_image_data(
        "fmnist",
        (fit_size(train_images, size, mode), train_labels),
        (fit_size(test_images, size, mode), test_labels),
        num_classes=10,
    )
