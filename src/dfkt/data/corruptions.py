"""Image corruptions of MNIST-C (Mu & Gilmer, 2019) at severities 1-5, on two scales.

Each corruption maps float images in [0, 1] (N×C×H×W NumPy arrays) and a seeded NumPy
generator to corrupted images; ``corrupt`` wraps them for uint8 tensors and seeds them from
(seed, corruption, severity), so a shifted dataset is the same on every machine and the two
scales give the same images wherever their parameters agree.

Scales (``SCALES``):
- ``mnist-c`` (the default): the five-level parameters of MNIST-C's code
  (google-research/mnist-c, corruptions.py). Lengths there are pixels of 28×28 images and scale
  here with the side (×side/28). Noise, contrast and brightness have the same tables on both
  scales. MNIST-C's data set has one level per corruption, the default of its function
  (``MNIST_C_SEVERITY``: rotate 2 = ±0.4 rad ≈ 23°, translate 3 = 3 px along each axis); stripe
  and inversion have no levels there, and every severity gives the same images.
- ``dfkt``: the project's earlier scales (severity 5 hard but recognisable on 28-32 px images;
  rotate 3 = 30-40°, translate 3 = 20% of the side), kept for results measured with them.

``GEOMETRIC`` corruptions move pixels and can leave a source model near chance, where methods
built on the cluster assumption cannot work: report them apart, as a stress test.
Geometric ones use torch's affine grids, blurs SciPy, noise NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
        kernel[
            np.round(centre + t * math.sin(angle)).astype(int), np.round(centre + t * math.cos(angle)).astype(int)
        ] = 1
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
        out[i, :, :, start : start + severity] = 1.0
    return out


def inversion(x, severity, rng):
    """A blend towards the negative: (1 − a)·x + a·(1 − x), a = 0.6 ... 1.0."""
    a = (0.6, 0.7, 0.8, 0.9, 1.0)[severity - 1]
    return (1 - a) * x + a * (1 - x)


# MNIST-C's parameters (google-research/mnist-c, corruptions.py). ----------------------------------


def _per_28(x: np.ndarray) -> float:
    """MNIST-C's lengths are pixels of 28×28 images: the factor for this side."""
    return x.shape[3] / 28


def mnistc_gaussian_blur(x, severity, rng):
    """skimage's gaussian (mode nearest, truncate 4) with σ = 1, 2, 3, 4, 6 px. MNIST-C calls it with
    multichannel=True on 2-D images, which blurs along the rows' axis only; here σ applies both ways."""
    sigma = (1, 2, 3, 4, 6)[severity - 1] * _per_28(x)
    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)


def mnistc_motion_blur(x, severity, rng):
    """ImageMagick's MotionBlurImage(radius, sigma, angle) as MNIST-C calls it, (radius, sigma) = (10, 3),
    (15, 5), (15, 8), (15, 12), (20, 15) px and an angle uniform in ±45° from the horizontal: each
    pixel the weighted mean of the 2·radius + 1 pixels from it along the angle, weights
    exp(−i²/2σ²) normalised, offsets rounded to whole pixels, edge pixels repeated outside."""
    factor = _per_28(x)
    radius, sigma = (v * factor for v in ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1])
    steps = np.arange(2 * math.ceil(radius) + 1)
    weights = np.exp(-(steps**2) / (2 * sigma**2))
    weights /= weights.sum()
    n, c, h, w = x.shape
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    out = np.empty_like(x)
    for i, angle in enumerate(np.deg2rad(rng.uniform(-45, 45, n))):
        dx = np.ceil(steps * math.cos(angle) - 0.5).astype(int)[:, None, None]
        dy = np.ceil(steps * math.sin(angle) - 0.5).astype(int)[:, None, None]
        index = (np.clip(rows + dy, 0, h - 1) * w + np.clip(cols + dx, 0, w - 1)).reshape(len(steps), -1)
        out[i] = np.einsum("s,csp->cp", weights, x[i].reshape(c, -1)[:, index]).reshape(c, h, w)
    return out


def _linear(x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Warp each image by its 2×2 matrix about the centre (output -> input), bilinear, zeros outside:
    skimage's warp(x, inverse_map=AffineTransform(...)) with MNIST-C's centring translation."""
    zero = np.zeros((len(matrices), 2, 1))
    return _affine(x, np.concatenate([matrices, zero], axis=2))


def mnistc_rotate(x, severity, rng):
    """By ±0.2, 0.4, 0.6, 0.8, 1.0 rad (≈ 11, 23, 34, 46, 57°), the sign random per image."""
    angle = (0.2, 0.4, 0.6, 0.8, 1.0)[severity - 1] * _signs(rng, x.shape[0])
    cos, sin = np.cos(angle), np.sin(angle)
    return _linear(x, np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1))


def mnistc_shear(x, severity, rng):
    """skimage's AffineTransform(shear=±c) of MNIST-C's time, c = 0.2 ... 1.0 rad, the sign random per
    image: (x, y) -> (x − sin(c)·y, cos(c)·y) about the centre."""
    c = (0.2, 0.4, 0.6, 0.8, 1.0)[severity - 1] * _signs(rng, x.shape[0])
    one, zero = np.ones_like(c), np.zeros_like(c)
    return _linear(x, np.stack([np.stack([one, -np.sin(c)], 1), np.stack([zero, np.cos(c)], 1)], 1))


def mnistc_scale(x, severity, rng):
    """Shrink about the centre to 0.9, 0.8, 0.7, 0.6, 0.5 of the size."""
    inverse = np.full(x.shape[0], 1 / (0.9, 0.8, 0.7, 0.6, 0.5)[severity - 1])
    zero = np.zeros_like(inverse)
    return _linear(x, np.stack([np.stack([inverse, zero], 1), np.stack([zero, inverse], 1)], 1))


def mnistc_translate(x, severity, rng):
    """By 1, 2, 3, 4, 5 px along each axis, each sign random per image (a diagonal move)."""
    n = x.shape[0]
    shift = 2 * (1, 2, 3, 4, 5)[severity - 1] / 28  # normalised coordinates: the side is 2
    dx, dy = shift * _signs(rng, n), shift * _signs(rng, n)
    one, zero = np.ones(n), np.zeros(n)
    return _affine(x, np.stack([np.stack([one, zero, dx], 1), np.stack([zero, one, dy], 1)], 1))


def mnistc_stripe(x, severity, rng):
    """The outer quarters inverted: columns 0-6 and 21-27 of 28 (one level in MNIST-C)."""
    out = x.copy()
    quarter = int(round(x.shape[3] * 7 / 28))
    out[..., :quarter] = 1 - out[..., :quarter]
    out[..., x.shape[3] - quarter :] = 1 - out[..., x.shape[3] - quarter :]
    return out


def mnistc_inversion(x, severity, rng):
    """The negative, 1 − x (MNIST-C's inverse; one level)."""
    return 1 - x


DFKT_SCALE: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "contrast": contrast,
    "brightness": brightness,
    "rotate": rotate,
    "shear": shear,
    "scale": scale,
    "translate": translate,
    "stripe": stripe,
    "inversion": inversion,
}
MNIST_C_SCALE: dict[str, Corruption] = {
    **DFKT_SCALE,  # noise, contrast and brightness: MNIST-C's own tables
    "gaussian_blur": mnistc_gaussian_blur,
    "motion_blur": mnistc_motion_blur,
    "rotate": mnistc_rotate,
    "shear": mnistc_shear,
    "scale": mnistc_scale,
    "translate": mnistc_translate,
    "stripe": mnistc_stripe,
    "inversion": mnistc_inversion,
}
SCALES: dict[str, dict[str, Corruption]] = {"mnist-c": MNIST_C_SCALE, "dfkt": DFKT_SCALE}
DEFAULT_SCALE = "mnist-c"
CORRUPTIONS = MNIST_C_SCALE  # the names (the same on every scale), and the default scale's functions
ALIASES = {"noise": "gaussian_noise", "blur": "gaussian_blur"}
GEOMETRIC = ("rotate", "shear", "scale", "translate")  # a stress test, reported apart
# The level of each corruption in MNIST-C's data set: the default severity of its function in MNIST-C's
# corruptions.py (gaussian_noise, gaussian_blur and contrast are among its 31 candidates, not its final 15).
# Stripe and inversion have one level (every severity gives it): 1 here.
MNIST_C_SEVERITY = {
    "gaussian_noise": 5,
    "shot_noise": 5,
    "impulse_noise": 4,
    "gaussian_blur": 2,
    "motion_blur": 1,
    "contrast": 4,
    "brightness": 5,
    "rotate": 2,
    "shear": 2,
    "scale": 3,
    "translate": 3,
    "stripe": 1,
    "inversion": 1,
}


def corruption_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; valid corruptions: {', '.join([*CORRUPTIONS, *ALIASES])}")
    return name


def scale_name(scale: str) -> str:
    if scale not in SCALES:
        raise ConfigError(
            f"unknown corruption scale {scale!r}; valid scales: {', '.join(SCALES)} (default {DEFAULT_SCALE})"
        )
    return scale


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, scale: str = DEFAULT_SCALE) -> torch.Tensor:
    """uint8 N×C×H×W images under corruption ``name`` at ``severity`` (1-5) on ``scale``, deterministically."""
    name, functions = corruption_name(name), SCALES[scale_name(scale)]
    if severity not in range(1, 6):
        raise ConfigError(f"corruption severity must be 1-5, got {severity}")
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity])
    x = images.numpy().astype(np.float32) / 255.0
    out = functions[name](x, severity, rng)
    return torch.from_numpy(np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8))
