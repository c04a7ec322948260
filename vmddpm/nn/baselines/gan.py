"""DCGAN generator and discriminator (Radford et al., 2016), shared by the dcgan and wgan_gp presets.

Why one family: the two GAN baselines differ only in the objective (non-saturating BCE vs WGAN-GP),
so they share the networks. The discriminator has no BatchNorm (the WGAN-GP gradient penalty is
per-sample, which BatchNorm would break); the generator keeps BatchNorm as in DCGAN and is sampled in
eval mode, so an image depends only on its own latent.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_MULT = 8  # channel multiplier cap at the coarsest resolution, as in DCGAN (ngf * 8)


def _levels(image_size: int) -> int:
    """Number of 2x resolution changes between 4x4 and `image_size` (a power of two >= 16)."""
    n = image_size.bit_length() - 1 if image_size > 0 else 0
    if image_size < 16 or 2**n != image_size:
        raise ValueError(f"image size must be a power of two >= 16, got {image_size}")
    return n - 2


def _mult(i: int, n: int) -> int:
    """Channel multiplier of the i-th coarsest of n+1 resolutions (8, 4, 2, 1 ... capped)."""
    return min(MAX_MULT, 2 ** (n - i))


class Generator(nn.Module):
    """forward(z (B, z_dim)) -> images (B, 1, S, S) in [-1, 1]."""

    def __init__(self, *, z_dim: int, g_channels: int, image_size: int) -> None:
        super().__init__()
        n = _levels(image_size)
        self.z_dim = z_dim
        ch = g_channels * _mult(0, n)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        for i in range(1, n):
            out = g_channels * _mult(i, n)
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            ch = out
        layers += [nn.ConvTranspose2d(ch, 1, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """forward(images (B, 1, S, S)) -> one real-valued score per image (B,)."""

    def __init__(self, *, d_channels: int, image_size: int) -> None:
        super().__init__()
        n = _levels(image_size)
        layers: list[nn.Module] = []
        ch = 1
        for i in range(n):
            out = d_channels * _mult(n - 1 - i, n - 1)
            layers += [nn.Conv2d(ch, out, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0))  # 4x4 -> 1x1
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)[:, 0]


def _dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
