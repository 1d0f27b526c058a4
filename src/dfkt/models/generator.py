"""Generators from noise to images.

``dafl``: the DAFL generator (Chen et al., 2019, "Data-Free Learning of Student Networks"), also
used by RDSKD. A linear layer maps noise to a 128-channel (s/4)x(s/4) map, which two
nearest-neighbour upsampling stages bring to s x s.
``deep``: the same design with as many upsampling stages as the image needs, starting from a
map of at most 8x8 (7x7 and five stages for 224x224 ImageNet-style teachers), so the linear
layer stays small (DAFL's would map noise to 128x56x56 at 224).
Both end in tanh and an affine-free BatchNorm, so each channel of a training batch is standardised.
"""

from __future__ import annotations

import torch
from torch import nn

from dfkt.errors import ConfigError
from dfkt.registry import GENERATORS


MAX_LINEAR_WEIGHTS = 50_000_000  # past this (e.g. nz 1000 at 224x224: 401M) the deep generator is the fit


class DAFLGenerator(nn.Module):
    """Noise (N, nz) -> images (N, out_channels, image_size, image_size)."""

    def __init__(self, nz: int, out_channels: int, image_size: int):
        super().__init__()
        if image_size < 4 or image_size % 4 != 0:
            raise ConfigError(
                f"the dafl generator needs image_size divisible by 4, got {image_size}; resize or pad the data"
            )
        weights = nz * 128 * (image_size // 4) ** 2
        if weights > MAX_LINEAR_WEIGHTS:
            raise ConfigError(f"the dafl generator's first layer would have {weights:,} weights at {image_size}x"
                              f"{image_size}; use --set params.generator=deep (or a paper-imagenet preset)")
        self.nz = nz
        self.out_channels = out_channels
        self.image_size = image_size
        self.init_size = image_size // 4
        self.fc = nn.Linear(nz, 128 * self.init_size**2)
        # eps=0.8 follows the DAFL code; it damps the normalisation of these layers.
        self.body = nn.Sequential(
            nn.BatchNorm2d(128),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.BatchNorm2d(128, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, out_channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(out_channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.fc(z).view(z.shape[0], 128, self.init_size, self.init_size)
        return self.body(out)


class DeepGenerator(nn.Module):
    """Noise (N, nz) -> images (N, out_channels, s, s) with s = init x 2^k, init <= 8: a linear layer
    to a 256-channel init x init map, then k stages of x2 nearest upsampling, conv3x3, BatchNorm
    (eps 0.8, as DAFL's) and LeakyReLU 0.2, the channels halving down to 32."""

    def __init__(self, nz: int, out_channels: int, image_size: int):
        super().__init__()
        stages, init = 0, image_size
        while init > 8 and init % 2 == 0:
            stages, init = stages + 1, init // 2
        if init > 8 or stages == 0:
            raise ConfigError(f"the deep generator needs image_size = a number up to 8 times a power of two (e.g. 32, "
                              f"64, 224), got {image_size}; resize the data")
        self.nz, self.out_channels, self.image_size, self.init_size = nz, out_channels, image_size, init
        widths = [max(32, 256 >> i) for i in range(stages + 1)]
        self.fc = nn.Linear(nz, widths[0] * init**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       nn.BatchNorm2d(c_out, eps=0.8), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(widths[-1], out_channels, 3, padding=1), nn.Tanh(),
                   nn.BatchNorm2d(out_channels, affine=False)]
        self.body = nn.Sequential(*layers)
        self.first_width = widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(z.shape[0], self.first_width, self.init_size, self.init_size))


@GENERATORS.register("deep")
def deep(nz: int, out_channels: int, image_size: int) -> DeepGenerator:
    return DeepGenerator(nz, out_channels, image_size)


@GENERATORS.register("dafl")
def dafl(nz: int, out_channels: int, image_size: int) -> DAFLGenerator:
    return DAFLGenerator(nz, out_channels, image_size)
