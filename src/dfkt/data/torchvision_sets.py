"""MNIST, USPS, SVHN and CIFAR-10/100 through torchvision.datasets, as uint8 tensors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfkt.data.base import ImageData, fit_size, make_image_data
from dfkt.errors import DatasetUnavailableError
from dfkt.registry import DATASETS

# (images uint8 N×C×H×W, labels int64) for one split.
Split = tuple[torch.Tensor, torch.Tensor]


def default_root() -> Path:
    """Where torchvision datasets live unless ``root`` is given: ``$DFKT_DATA_ROOT`` or ``~/.cache/dfkt/datasets``."""
    return Path(os.environ.get("DFKT_DATA_ROOT") or "~/.cache/dfkt/datasets").expanduser()


def _labels(values) -> torch.Tensor:
    """torchvision keeps labels as lists, numpy arrays or tensors; make them int64 tensors."""
    return torch.as_tensor(np.asarray(values), dtype=torch.int64)


# Readers: build the torchvision dataset and take its arrays directly (no PIL round trip).
# torchvision is imported inside them because importing it is slow and most runs never need it.


def _read_mnist(root: str, train: bool, download: bool) -> Split:
    from torchvision.datasets import MNIST

    ds = MNIST(root, train=train, download=download)
    return ds.data.to(torch.uint8).unsqueeze(1), _labels(ds.targets)


def _read_usps(root: str, train: bool, download: bool) -> Split:
    from torchvision.datasets import USPS

    ds = USPS(root, train=train, download=download)
    return torch.from_numpy(ds.data).unsqueeze(1), _labels(ds.targets)


def _read_svhn(root: str, train: bool, download: bool) -> Split:
    from torchvision.datasets import SVHN

    ds = SVHN(root, split="train" if train else "test", download=download)
    return torch.from_numpy(ds.data).contiguous(), _labels(ds.labels)


def _read_cifar10(root: str, train: bool, download: bool) -> Split:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root, train=train, download=download)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), _labels(ds.targets)


def _read_cifar100(root: str, train: bool, download: bool) -> Split:
    from torchvision.datasets import CIFAR100

    ds = CIFAR100(root, train=train, download=download)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), _labels(ds.targets)


@dataclass(frozen=True)
class _Spec:
    """How to load one torchvision dataset and where its files must go."""

    name: str
    title: str
    read: Callable[[str, bool, bool], Split]
    folder: str  # relative to root: the folder torchvision looks in
    files: str  # what must be in that folder
    num_classes: int
    default_size: int
    mode: str  # how fit_size changes the size


_MNIST = _Spec(
    "mnist",
    "MNIST",
    _read_mnist,
    "MNIST/raw",
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte",
    num_classes=10,
    default_size=32,
    mode="resize",
)
_USPS = _Spec(
    "usps",
    "USPS",
    _read_usps,
    ".",
    "usps.bz2 and usps.t.bz2",
    num_classes=10,
    default_size=32,
    mode="resize",
)
_SVHN = _Spec(
    "svhn",
    "SVHN",
    _read_svhn,
    ".",
    "train_32x32.mat and test_32x32.mat",
    num_classes=10,
    default_size=32,
    mode="resize",
)
_CIFAR10 = _Spec(
    "cifar10",
    "CIFAR-10",
    _read_cifar10,
    "cifar-10-batches-py",
    "data_batch_1..5, test_batch and batches.meta (from cifar-10-python.tar.gz)",
    num_classes=10,
    default_size=32,
    mode="resize",
)
_CIFAR100 = _Spec(
    "cifar100",
    "CIFAR-100",
    _read_cifar100,
    "cifar-100-python",
    "train, test and meta (from cifar-100-python.tar.gz)",
    num_classes=100,
    default_size=32,
    mode="resize",
)

# What torchvision raises for missing or cut-off files (RuntimeError, FileNotFoundError, EOFError)
# and for failed downloads (RuntimeError, URLError which is an OSError).
_LOAD_ERRORS = (RuntimeError, OSError, EOFError)


def _one_line(message: str, limit: int = 160) -> str:
    """Collapse a (multi-line) torchvision message into one short line."""
    text = " ".join(message.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _load(spec: _Spec, root: str | None, download: bool, image_size: int | None) -> ImageData:
    """Read both splits of ``spec``, turning torchvision's failures into one-line errors."""
    base = Path(root).expanduser() if root else default_root()
    folder = (base / spec.folder).resolve()
    try:
        train = spec.read(str(base), True, download)
        test = spec.read(str(base), False, download)
    except _LOAD_ERRORS as exc:
        reason = _one_line(str(exc))
        if download:
            raise DatasetUnavailableError(
                f"could not download {spec.title} into {base} ({reason}): check the internet connection, "
                f"or put {spec.files} in {folder}/ and run without --download"
            ) from None
        raise DatasetUnavailableError(
            f"{spec.title} not found or incomplete in {folder}/: put {spec.files} there, "
            "or add --download to fetch them (needs internet)"
        ) from None
    size = spec.default_size if image_size is None else image_size
    return make_image_data(
        spec.name,
        (fit_size(train[0], size, spec.mode), train[1]),
        (fit_size(test[0], size, spec.mode), test[1]),
        spec.num_classes,
    )


@DATASETS.register("mnist")
def load_mnist(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """MNIST (60,000 / 10,000, 10 classes), resized 28→32 by default as in the RDSKD protocol."""
    return _load(_MNIST, root, download, image_size)


@DATASETS.register("usps")
def load_usps(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """USPS (7,291 / 2,007, 10 classes), resized 16→32 by default to match MNIST models."""
    return _load(_USPS, root, download, image_size)


@DATASETS.register("svhn")
def load_svhn(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """SVHN cropped digits (73,257 / 26,032, 10 classes; label 0 is the digit 0), native 32×32."""
    return _load(_SVHN, root, download, image_size)


@DATASETS.register("cifar10")
def load_cifar10(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """CIFAR-10 (50,000 / 10,000, 10 classes), native 32×32."""
    return _load(_CIFAR10, root, download, image_size)


@DATASETS.register("cifar100")
def load_cifar100(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """CIFAR-100 (50,000 / 10,000, 100 fine classes), native 32×32."""
    return _load(_CIFAR100, root, download, image_size)
