"""Cheap tensor augmentations that run on the device, batched, with a private RNG."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_and_flip(images: Tensor, rng: torch.Generator, max_shift: int | None = None) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (default: 1/16 of the width) and a
    horizontal flip, per sample. Fills with zeros: the mean, for normalised images."""
    return _shift_flip(images, rng, max_shift if max_shift is not None else max(1, images.shape[3] // 16), True)


def crop_and_flip(images: Tensor, rng: torch.Generator, padding: int, flip: bool, fill: Tensor | None = None) -> Tensor:
    """Per sample, a random crop of the image padded by ``padding`` pixels on each side (filled with
    ``fill``, per channel; default 0), back at its own size, and with ``flip`` a horizontal flip of half
    the samples: torchvision's/kornia's RandomCrop(size, padding) + RandomHorizontalFlip."""
    fill = (
        torch.zeros(1, images.shape[1], 1, 1, device=images.device, dtype=images.dtype)
        if fill is None
        else fill.to(images.device, images.dtype).view(1, -1, 1, 1)
    )
    return _shift_flip(images - fill, rng, padding, flip) + fill


def crop_and_rotate(
    images: Tensor, rng: torch.Generator, padding: int, max_degrees: float, fill: Tensor | None = None
) -> Tensor:
    """Per sample, torchvision's RandomCrop(size, padding) then RandomRotation(``max_degrees``): a random
    crop of the image padded by ``padding`` pixels on each side, back at its own size, then a rotation
    about the centre by an angle uniform in ±``max_degrees``, resampled at the nearest pixel (torchvision's
    default). Pixels from outside take ``fill`` (per channel; default 0). SHOT's USPS->MNIST source
    augmentation is padding 4 and 10 degrees on 28x28 images."""
    n, c, _, _ = images.shape
    fill = (
        torch.zeros(1, c, 1, 1, device=images.device, dtype=images.dtype)
        if fill is None
        else fill.to(images.device, images.dtype).view(1, -1, 1, 1)
    )
    out = _shift_flip(images - fill, rng, padding, False)
    angle = (torch.rand(n, device=images.device, generator=rng) * 2 - 1) * max_degrees * (torch.pi / 180)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(out.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(
        out.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    ).to(images.dtype)
    return out + fill


# Datasets whose classes survive a horizontal flip (clothes, objects); digits and letters do not.
MIRROR_SAFE = frozenset({"fmnist", "cifar10", "cifar100"})
AUGMENTATIONS = ("shift", "flip", "rotate", "scale", "blur", "brightness", "mixup", "cutmix")


def mirror_safe(dataset: str | None) -> bool:
    """Whether a horizontal flip keeps an image of ``dataset`` in its class (unknown data: no)."""
    return dataset in MIRROR_SAFE


def augment_batch(
    images: Tensor,
    kinds: list[str],
    rng: torch.Generator,
    fill: Tensor | None = None,
    max_degrees: float = 15.0,
    max_scale: float = 0.1,
    max_blur: float = 1.0,
    max_brightness: float = 0.4,
    high: Tensor | None = None,
) -> Tensor:
    """``images`` (normalised, N×C×H×W) with each of ``kinds`` applied per sample, in the order of
    AUGMENTATIONS: shift (up to 1/16 of the width), flip (horizontal, half the samples), rotate
    (±``max_degrees``), scale (×1 ± ``max_scale``), blur (a Gaussian of σ uniform in [0, ``max_blur``] pixels),
    brightness (the distance from ``fill`` ×1 ± ``max_brightness``, kept between ``fill`` and ``high`` per channel
    when ``high`` is given: with ``fill`` black, a brightness change; with the default, a contrast change), mixup
    (λ·x + (1−λ)·x', λ ~ U(0, 1) = Beta(1, 1); Zhang et al., 2018) and cutmix (a box of area (1−λ) of x'
    pasted into x; Yun et al., 2019), x' being the batch in random order.
    Pixels moved in from outside take ``fill`` (per channel; default 0, the mean). The result is new
    images, not label mixtures: the caller asks the teacher what they are."""
    n, c, h, w = images.shape
    device = images.device
    fill = (
        torch.zeros(1, c, 1, 1, device=device, dtype=images.dtype)
        if fill is None
        else fill.to(device, images.dtype).view(1, -1, 1, 1)
    )
    out = images - fill  # work around the fill value, so padding with zeros pads with ``fill``
    if "shift" in kinds or "flip" in kinds:
        shift = max(1, w // 16) if "shift" in kinds else 0
        out = _shift_flip(out, rng, shift, flip="flip" in kinds)
    if "rotate" in kinds or "scale" in kinds:
        angle = (
            (torch.rand(n, device=device, generator=rng) * 2 - 1) * max_degrees * (torch.pi / 180)
            if "rotate" in kinds
            else torch.zeros(n, device=device)
        )
        scale = (
            1 + (torch.rand(n, device=device, generator=rng) * 2 - 1) * max_scale
            if "scale" in kinds
            else torch.ones(n, device=device)
        )
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1
        )
        grid = torch.nn.functional.affine_grid(theta, (n, c, h, w), align_corners=False)
        out = torch.nn.functional.grid_sample(out.float(), grid, align_corners=False).to(images.dtype)
    if "blur" in kinds:
        out = gaussian_blur(out, torch.rand(n, device=device, generator=rng) * max_blur)
    if "brightness" in kinds:
        factor = 1 + (torch.rand(n, device=device, generator=rng) * 2 - 1) * max_brightness
        out = out * factor.view(-1, 1, 1, 1).to(out.dtype)
        if high is not None:  # pixels stay between black and white
            out = torch.minimum(out.clamp_min(0), high.to(device, out.dtype).view(1, -1, 1, 1) - fill)
    if "mixup" in kinds:
        lam = torch.rand(n, device=device, generator=rng)
        partner = out[torch.randperm(n, device=device, generator=rng)]
        out = lam.view(-1, 1, 1, 1).to(out.dtype) * out + (1 - lam.view(-1, 1, 1, 1).to(out.dtype)) * partner
    if "cutmix" in kinds:
        lam = torch.rand(n, device=device, generator=rng)
        partner = out[torch.randperm(n, device=device, generator=rng)]
        cut_h, cut_w = (h * torch.sqrt(1 - lam)).long(), (w * torch.sqrt(1 - lam)).long()
        cy = torch.randint(0, h, (n,), device=device, generator=rng)
        cx = torch.randint(0, w, (n,), device=device, generator=rng)
        rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
        inside_y = (rows[None, :] - cy[:, None]).abs() * 2 < cut_h[:, None]  # n × h
        inside_x = (cols[None, :] - cx[:, None]).abs() * 2 < cut_w[:, None]  # n × w
        box = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # n × 1 × h × w
        out = torch.where(box, partner, out)
    return out + fill


def gaussian_blur(images: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
    """Each image blurred by a separable Gaussian of its own ``sigma`` (pixels; 0 leaves it as it is),
    over a (2·radius + 1)² window, edges padded by reflection."""
    n, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    weights = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma.float().clamp_min(1e-3)[:, None] ** 2))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n·c) × k: one kernel per plane
    with torch.autocast(images.device.type, enabled=False):  # fp32 kernels: in bf16 σ = 0 would not be the identity
        planes = torch.nn.functional.pad(images.float().reshape(1, n * c, h, w), [radius] * 4, mode="reflect")
        planes = torch.nn.functional.conv2d(planes, weights[:, None, None, :], groups=n * c)  # along rows
        planes = torch.nn.functional.conv2d(planes, weights[:, None, :, None], groups=n * c)  # along columns
    return planes.reshape(n, c, h, w).to(images.dtype)


def _shift_flip(images: Tensor, rng: torch.Generator, max_shift: int, flip: bool) -> Tensor:
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, [max_shift] * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), device=device, generator=rng)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), device=device, generator=rng)
    rows = dy[:, None] + torch.arange(h, device=device)[None, :]
    cols = dx[:, None] + torch.arange(w, device=device)[None, :]
    if flip:
        flipped = torch.rand(n, device=device, generator=rng) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)
