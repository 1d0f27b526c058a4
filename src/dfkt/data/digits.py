"""scikit-learn's 8×8 handwritten digits: tiny, bundled, always available offline."""

from __future__ import annotations

import numpy as np
import torch

from dfkt.data.base import ImageData, fit_size, make_image_data
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
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0
    )
    images_t = torch.from_numpy(images).unsqueeze(1)
    labels_t = torch.from_numpy(labels)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    size = 8 if image_size is None else image_size
    return make_image_data(
        "digits",
        (fit_size(images_t[train_idx], size, "resize"), labels_t[train_idx]),
        (fit_size(images_t[test_idx], size, "resize"), labels_t[test_idx]),
        num_classes=10,
    )
