"""Image corruptions in the style of MNIST-C / Fashion-MNIST-C, at severities 1-5.

Each corruption maps float images in [0, 1] (N×C×H×W NumPy arrays) and a seeded NumPy
generator to corrupted images; ``corrupt`` wraps them for uint8 tensors and seeds them from
(seed, corruption, severity), so a shifted dataset is the same on every machine. The severity
scales are this project's (chosen so severity 5 is hard but recognisable on 28-32 px images).
Geometric ones use torch's affine grids, blurs SciPy, noise NumPy.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dfkt.errors import ConfigError

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def gaussian_noise(x, severity, rng):
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + rng.normal(0.0, sigma, x.shape)


def shot_noise(x, severity, rng):
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return rng.poisson(x * photons) / photons


def impulse_noise(x, severity, rng):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    hit = rng.random(x.shape) < amount
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(x.dtype), x)


def gaussian_blur(x, severity, rng):
    sigma = (0.5, 0.75, 1.0, 1.5, 2.0)[severity - 1]
    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma))


def motion_blur(x, severity, rng):
    """A line kernel of the given length at a random angle per image."""
    length = (3, 5, 7, 9, 11)[severity - 1]
    out = np.empty_like(x)
    for i, angle in enumerate(rng.uniform(0, math.pi, x.shape[0])):
        kernel = np.zeros((length, length))
        centre, t = length // 2, np.linspace(-(length // 2), length // 2, 4 * length)
        kernel[np.round(centre + t * math.sin(angle)).astype(int), np.round(centre + t * math.cos(angle)).astype(int)] = 1
        out[i] = ndimage.convolve(x[i], (kernel / kernel.sum())[None], mode="constant")
    return out


def contrast(x, severity, rng):
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def brightness(x, severity, rng):
    return x + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]


def _affine(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Warp each image by its 2×3 matrix (normalised coordinates, output -> input), zeros outside."""
    images = torch.from_numpy(x).float()
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).numpy()


def _signs(rng, n):
    return rng.choice((-1.0, 1.0), n)


def rotate(x, severity, rng):
    """By a random angle in [a, a + 10] degrees (a = 10, 20, ..., 50), with a random sign."""
    low = (10, 20, 30, 40, 50)[severity - 1]
    angle = np.deg2rad(rng.uniform(low, low + 10, x.shape[0]) * _signs(rng, x.shape[0]))
    cos, sin = np.cos(angle), np.sin(angle)
    return _affine(x, np.stack([np.stack([cos, -sin, 0 * cos], 1), np.stack([sin, cos, 0 * cos], 1)], 1))


def shear(x, severity, rng):
    low = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    s = rng.uniform(low, low + 0.1, x.shape[0]) * _signs(rng, x.shape[0])
    one, zero = np.ones_like(s), np.zeros_like(s)
    return _affine(x, np.stack([np.stack([one, s, zero], 1), np.stack([zero, one, zero], 1)], 1))


def scale(x, severity, rng):
    """Shrink towards the centre (zoom out) by a factor in [f, f + 0.05]."""
    factor = rng.uniform(*((0.85, 0.9), (0.75, 0.8), (0.65, 0.7), (0.55, 0.6), (0.45, 0.5))[severity - 1], x.shape[0])
    inverse, zero = 1.0 / factor, np.zeros_like(factor)
    return _affine(x, np.stack([np.stack([inverse, zero, zero], 1), np.stack([zero, inverse, zero], 1)], 1))


def translate(x, severity, rng):
    """Shift by a fraction of the side in a random direction."""
    fraction = (0.08, 0.14, 0.2, 0.26, 0.32)[severity - 1]
    angle = rng.uniform(0, 2 * math.pi, x.shape[0])
    dx, dy = 2 * fraction * np.cos(angle), 2 * fraction * np.sin(angle)
    one, zero = np.ones_like(dx), np.zeros_like(dx)
    return _affine(x, np.stack([np.stack([one, zero, dx], 1), np.stack([zero, one, dy], 1)], 1))


def stripe(x, severity, rng):
    """A bright vertical stripe, ``severity`` pixels wide, at a random column per image."""
    out = x.copy()
    width = x.shape[3]
    for i, start in enumerate(rng.integers(0, width - severity + 1, x.shape[0])):
        out[i, :, :, start:start + severity] = 1.0
    return out


def inversion(x, severity, rng):
    """A blend towards the negative: (1 − a)·x + a·(1 − x), a = 0.6 ... 1.0."""
    a = (0.6, 0.7, 0.8, 0.9, 1.0)[severity - 1]
    return (1 - a) * x + a * (1 - x)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur, "motion_blur": motion_blur, "contrast": contrast, "brightness": brightness,
    "rotate": rotate, "shear": shear, "scale": scale, "translate": translate, "stripe": stripe,
    "inversion": inversion,
}
ALIASES = {"noise": "gaussian_noise", "blur": "gaussian_blur"}


def corruption_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; valid corruptions: {', '.join([*CORRUPTIONS, *ALIASES])}")
    return name


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 N×C×H×W images under corruption ``name`` at ``severity`` (1-5), deterministically."""
    name = corruption_name(name)
    if severity not in range(1, 6):
        raise ConfigError(f"corruption severity must be 1-5, got {severity}")
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity])
    x = images.numpy().astype(np.float32) / 255.0
    out = CORRUPTIONS[name](x, severity, rng)
    return torch.from_numpy(np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8))
