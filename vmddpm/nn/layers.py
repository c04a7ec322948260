"""Small building blocks shared by the VM-DDPM U-Net (and usable by the baselines).

Why here: the time embedding, norms and resampling layers are the standard DDPM ones (Ho et al. 2020);
keeping them in one place means every diffusion network in the project embeds `t` the same way, so
the comparison between networks is about their mixers, not about incidental plumbing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps `t` of shape (B,) -> (B, dim).

    The transformer position encoding as used by DDPM: half the channels are sines, half cosines, at
    geometrically spaced frequencies; an odd `dim` gets one zero channel.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP (Linear -> SiLU -> Linear)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.dim))


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `max_groups` that divides `channels`.

    Why: DDPM uses 32 groups, which does not divide the small widths of the demo and test networks;
    falling back to a divisor keeps one code path for every width.
    """
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (learned, as in DDPM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 convolution (avoids checkerboards)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: a residual branch that starts as the identity trains more stably."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
