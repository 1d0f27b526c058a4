"""The DAFL generator (Chen et al., 2019, "Data-Free Learning of Student Networks"), also used by RDSKD.

A linear layer maps noise to a 128-channel (s/4)x(s/4) map, which two nearest-neighbour
upsampling stages bring to s x s. The output ends in tanh and an affine-free BatchNorm,
so each channel of a training batch is standardised.
"""

from __future__ import annotations

import torch
from torch import nn

from dfkt.errors import ConfigError
from dfkt.registry import GENERATORS


class DAFLGenerator(nn.Module):
    """Noise (N, nz) -> images (N, out_channels, image_size, image_size)."""

    def __init__(self, nz: int, out_channels: int, image_size: int):
        super().__init__()
        if image_size < 4 or image_size % 4 != 0:
            raise ConfigError(
                f"the dafl generator needs image_size divisible by 4, got {image_size}; resize or pad the data"
            )
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


@GENERATORS.register("dafl")
def dafl(nz: int, out_channels: int, image_size: int) -> DAFLGenerator:
    return DAFLGenerator(nz, out_channels, image_size)
