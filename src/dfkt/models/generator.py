"""Generators from noise to images.

``dafl``: the DAFL generator (Chen et al., 2019, "Data-Free Learning of Student Networks"), also
used by RDSKD. A linear layer maps noise to a 128-channel (s/4)x(s/4) map, which two
nearest-neighbour upsampling stages bring to s x s.
``deep``: the same design with as many upsampling stages as the image needs, starting from a
map of at most 8x8 (7x7 and five stages for 224x224 ImageNet-style teachers), so the linear
layer stays small (DAFL's would map noise to 128x56x56 at 224).
Both end, as the authors' do, in tanh and an affine-free BatchNorm (``output="bn"``), so each channel
of a training batch is standardised; at initialisation that spans about ±5 in normalised units, far
outside the range real images occupy. ``output="pixels"`` ends instead in a sigmoid in pixel space,
normalised with the teacher's mean and std, as CMI's and Fast's generators do: every sample is then
an image the teacher could have been given.
``width`` is the channel count of the first stages (DAFL: 128); cost per image grows with its
square, so it is the knob that sizes synthesis to a CPU budget (``multiply_adds``).
``smoothing`` > 0 ends either generator in a fixed Gaussian blur of that σ (pixels), so the generator's loss
shapes images that are smooth at that scale instead of fine textures (ours, not the authors'; a blur of
in-range images stays in range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from dfkt.data.augment import gaussian_blur
from dfkt.errors import ConfigError
from dfkt.registry import GENERATORS

MAX_LINEAR_WEIGHTS = 50_000_000  # past this (e.g. nz 1000 at 224x224: 401M) the deep generator is the fit
GeneratorOutput = Literal["bn", "pixels", "clamped"]


class ToImage(nn.Module):
    """The last layer: tanh + affine-free BatchNorm ("bn", the DAFL authors'), that then clamped into
    the range of real inputs ("clamped": the authors' layer, whose samples span about ±4.8 in normalised
    space, kept inside the teacher's input domain), or a sigmoid in pixel space then the teacher's
    normalisation ("pixels": inside that range too, but it starts as flat grey)."""

    def __init__(
        self,
        channels: int,
        output: GeneratorOutput,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        smoothing: float = 0.0,
        image_size: int | None = None,
    ):
        super().__init__()
        if smoothing < 0:
            raise ConfigError(f"generator smoothing is a Gaussian's σ in pixels, at least 0; got {smoothing}")
        self.radius = max(1, math.ceil(2 * smoothing))  # the blur's window reaches 2σ either way
        if smoothing and image_size is not None and self.radius >= image_size:
            raise ConfigError(
                f"generator smoothing σ={smoothing} needs images wider than {self.radius} pixels, got {image_size}; "
                f"use a σ below {image_size / 2:g}"
            )
        self.output = output
        self.smoothing = smoothing
        if output != "pixels":
            self.squash = nn.Sequential(nn.Tanh(), nn.BatchNorm2d(channels, affine=False))
            if output == "bn":
                return
        if mean is None or std is None:
            raise ConfigError(f"generator output '{output}' needs the teacher's normalisation mean and std")
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise ConfigError(f"normalisation for {channels} channels, got mean {list(mean)} and std {list(std)}")
        self.register_buffer(
            "mean",
            torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand(1, channels, 1, 1).clone(),
            persistent=False,
        )
        self.register_buffer(
            "std",
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).expand(1, channels, 1, 1).clone(),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "bn":
            images = self.squash(x)
        elif self.output == "clamped":  # pixel values 0 and 1, normalised
            images = torch.maximum(torch.minimum(self.squash(x), (1 - self.mean) / self.std), -self.mean / self.std)
        else:
            images = (torch.sigmoid(x) - self.mean) / self.std
        if self.smoothing == 0:
            return images
        sigma = torch.full((images.shape[0],), self.smoothing, device=images.device)
        return gaussian_blur(images, sigma, radius=self.radius)


class DAFLGenerator(nn.Module):
    """Noise (N, nz) -> images (N, out_channels, image_size, image_size)."""

    def __init__(
        self,
        nz: int,
        out_channels: int,
        image_size: int,
        width: int = 128,
        output: GeneratorOutput = "bn",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        smoothing: float = 0.0,
    ):
        super().__init__()
        if image_size < 4 or image_size % 4 != 0:
            raise ConfigError(
                f"the dafl generator needs image_size divisible by 4, got {image_size}; resize or pad the data"
            )
        if width < 2 or width % 2:
            raise ConfigError(f"generator width must be an even number of channels >= 2, got {width}")
        weights = nz * width * (image_size // 4) ** 2
        if weights > MAX_LINEAR_WEIGHTS:
            raise ConfigError(
                f"the dafl generator's first layer would have {weights:,} weights at {image_size}x"
                f"{image_size}; use --set params.generator=deep (or a paper-imagenet preset)"
            )
        self.nz = nz
        self.out_channels = out_channels
        self.image_size = image_size
        self.init_size = image_size // 4
        self.width = width
        self.fc = nn.Linear(nz, width * self.init_size**2)
        # eps=0.8 follows the DAFL code; it damps the normalisation of these layers.
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, out_channels, 3, padding=1),
            ToImage(out_channels, output, mean, std, smoothing, image_size),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.fc(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        return self.body(out)


class DeepGenerator(nn.Module):
    """Noise (N, nz) -> images (N, out_channels, s, s) with s = init x 2^k, init <= 8: a linear layer
    to a 256-channel init x init map, then k stages of x2 nearest upsampling, conv3x3, BatchNorm
    (eps 0.8, as DAFL's) and LeakyReLU 0.2, the channels halving down to 32."""

    def __init__(
        self,
        nz: int,
        out_channels: int,
        image_size: int,
        width: int = 256,
        output: GeneratorOutput = "bn",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        smoothing: float = 0.0,
    ):
        super().__init__()
        stages, init = 0, image_size
        while init > 8 and init % 2 == 0:
            stages, init = stages + 1, init // 2
        if init > 8 or stages == 0:
            raise ConfigError(
                f"the deep generator needs image_size = a number up to 8 times a power of two (e.g. 32, "
                f"64, 224), got {image_size}; resize the data"
            )
        self.nz, self.out_channels, self.image_size, self.init_size = nz, out_channels, image_size, init
        widths = [max(min(32, width), width >> i) for i in range(stages + 1)]
        self.fc = nn.Linear(nz, widths[0] * init**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out, eps=0.8),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [
            nn.Conv2d(widths[-1], out_channels, 3, padding=1),
            ToImage(out_channels, output, mean, std, smoothing, image_size),
        ]
        self.body = nn.Sequential(*layers)
        self.first_width = widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(z.shape[0], self.first_width, self.init_size, self.init_size))


@GENERATORS.register("deep")
def deep(nz: int, out_channels: int, image_size: int, width: int | None = None, **kw) -> DeepGenerator:
    return DeepGenerator(nz, out_channels, image_size, width or 256, **kw)


@GENERATORS.register("dafl")
def dafl(nz: int, out_channels: int, image_size: int, width: int | None = None, **kw) -> DAFLGenerator:
    return DAFLGenerator(nz, out_channels, image_size, width or 128, **kw)


class GeneratorEnsemble(nn.Module):
    """Several generators behind one noise-to-image interface: a batch of noise is split into as many
    consecutive chunks, one per member. Each member finds its own modes, so the ensemble covers more
    of each class than one generator of the same total cost per image, and depends less on one
    initialisation's luck."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(chunk) for member, chunk in zip(self.members, z.chunk(len(self.members)))])
