"""benchmarks/pool_vs_real.py's pixel statistics, on images whose answers are known by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from pool_vs_real import pixel_statistics  # noqa: E402

BLACK = -0.5


def test_flat_black_images_have_no_variation_and_are_all_black():
    stats = pixel_statistics(torch.full((256, 1, 8, 8), BLACK), BLACK)
    assert stats == pytest.approx(
        {"tv_per_128": 0.0, "share_at_black": 1.0, "border_mean": BLACK, "sd_of_image_means": 0.0}
    )


def test_half_white_images_and_one_vertical_edge():
    images = torch.full((128, 1, 8, 8), BLACK)
    images[::2] = 1.5  # every other image white: image means BLACK or 1.5
    stats = pixel_statistics(images, BLACK)
    assert stats["share_at_black"] == pytest.approx(0.5)
    assert stats["sd_of_image_means"] == pytest.approx(torch.tensor([BLACK, 1.5] * 64).std().item())
    assert stats["tv_per_128"] == 0.0  # flat images: no neighbour differences
    edge = torch.full((128, 1, 8, 8), BLACK)
    edge[..., 4:] = BLACK + 1.0  # a step of 1 between columns 3 and 4, 8 rows per image
    # horizontal: 8 differences of 1 per image; each diagonal: 7; vertical: none
    expected = (128 * 8) ** 0.5 + 2 * (128 * 7) ** 0.5
    assert pixel_statistics(edge, BLACK)["tv_per_128"] == pytest.approx(expected, rel=1e-5)


def test_the_border_is_all_four_sides_two_pixels_deep():
    images = torch.full((128, 1, 8, 8), BLACK)
    images[..., :, :2] = images[..., :, -2:] = 1.0  # the side columns only
    # 8×8 with a 2-pixel border: 48 border pixels, the 32 of the side columns white (1.0), the 16 of the top and
    # bottom rows between them black: (32 · 1 + 16 · BLACK) / 48
    assert pixel_statistics(images, BLACK)["border_mean"] == pytest.approx((32 + 16 * BLACK) / 48)
