"""The DDPM U-Net of Ho et al. (2020): the convolution + self-attention baseline of the comparison.

Why this layout: it is the reference denoiser the paper's DDPM baseline stands for: residual blocks
(GroupNorm, SiLU, 3x3 convs) that add a sinusoidal time embedding, self-attention at the low
resolutions named in `attn_resolutions` (absolute pixel sizes, 16 in the original), attention in the
middle block, strided-conv downsampling and nearest-neighbour upsampling with skip connections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in the Transformer/DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _groups(ch: int) -> int:
    """Largest group count <= 32 dividing `ch` (32 as in the paper when the width allows it)."""
    return next(g for g in range(min(32, ch), 0, -1) if ch % g == 0)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all H*W positions (quadratic in pixels, hence low resolutions)."""

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention width {ch} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """ResBlocks (each optionally followed by attention) at one resolution."""

    def __init__(
        self, chans: list[tuple[int, int]], temb: int, dropout: float, attn: bool, heads: int
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(a, b, temb, dropout) for a, b in chans)
        self.attn = nn.ModuleList(AttnBlock(b, heads) if attn else nn.Identity() for _, b in chans)


class UNetAttn(nn.Module):
    """forward(x (B, C, H, W), t (B,)) -> eps (B, C, H, W); H, W divisible by 2**(len(channel_mult)-1)."""

    def __init__(
        self,
        *,
        base_channels: int,
        channel_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        heads: int,
        dropout: float,
        in_channels: int,
        image_size: int,
    ) -> None:
        super().__init__()
        self.base, self.image_size = base_channels, image_size
        self.n_down = len(channel_mult) - 1
        if image_size % (2**self.n_down):
            raise ValueError(f"image size {image_size} is not divisible by 2**{self.n_down} (channel_mult)")
        temb = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [base_channels]
        ch = base_channels
        for i, mult in enumerate(channel_mult):
            res = image_size // 2**i
            out = base_channels * mult
            chans = []
            for _ in range(num_res_blocks):
                chans.append((ch, out))
                ch = out
                skips.append(ch)
            self.down.append(Level(chans, temb, dropout, res in attn_resolutions, heads))
            if i < self.n_down:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, temb, dropout)
        self.mid_attn = AttnBlock(ch, heads)
        self.mid2 = ResBlock(ch, ch, temb, dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            res = image_size // 2**i
            out = base_channels * mult
            chans = []
            for _ in range(num_res_blocks + 1):
                chans.append((ch + skips.pop(), out))
                ch = out
            self.up.append(Level(chans, temb, dropout, res in attn_resolutions, heads))
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % (2**self.n_down) or x.shape[-2] % (2**self.n_down):
            raise ValueError(f"input {tuple(x.shape)}: H and W must be divisible by {2**self.n_down}")
        emb = self.time_embed(timestep_embedding(t.expand(x.shape[0]) if t.numel() == 1 else t, self.base))
        h = self.stem(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(h, emb))
                hs.append(h)
            if i < self.n_down:
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for j, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), emb))
            if j < self.n_down:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)
