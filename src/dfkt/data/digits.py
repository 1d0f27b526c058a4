"""scikit-learn's 8×8 handwritten digits: tiny, bundled, always available offline."""

from __future__ import annotations

import numpy as np

from dfkt.data.base import ImageData, stratified_split
from dfkt.registry import DATASETS


@DATASETS.register("digits")
def load_digits(root: str | None, download: bool, image_size: int | None) -> ImageData:
    """scikit-learn's 1,797 8×8 digits (UCI); split 1,347 / 450, stratified, seed 0.

    Split: ``train_test_split(test_size=0.25, stratify=y, random_state=0)``, i.e. a fixed
    stratified split of 1,347 train / 450 test images. Pixel values 0..16 are scaled to
    0..255 (×255/16, rounded). ``root`` and ``download`` are ignored (the data ships with
    scikit-learn). Native size 8; other sizes are resized bilinearly.
    """
    # Imported here: scikit-learn is slow to import and only this loader needs it.
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return stratified_split("digits", images, labels, 0.25, 0, 8 if image_size is None else image_size)
