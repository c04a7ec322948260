"""A DiT (Peebles & Xie, 2023) on pixel patches: the quadratic-cost transformer baseline.

Why it is here: the paper argues that global self-attention costs O(N^2) in the number of tokens
while the S6 scan is linear. This is the plain transformer denoiser to compare against: non-overlapping
`patch_size` patches -> tokens with fixed 2-D sin-cos position embeddings, `depth` blocks of
multi-head self-attention + MLP conditioned on t by adaLN-Zero (shift/scale/gate regressed from the
time embedding, gates initialised at zero so every block starts as the identity), and a zero-initialised
linear head back to pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vmddpm.nn.baselines.unet_attn import timestep_embedding


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine position embedding (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for the 2-D position embedding")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = max(1, int(hidden * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        b, n, d = x.shape
        h = _modulate(self.norm1(x), s1, sc1)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1[:, None] * self.proj(a)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out)
        for m in (self.ada[1], self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """forward(x (B, C, S, S), t (B,)) -> eps (B, C, S, S) with S = image_size."""

    def __init__(
        self,
        *,
        patch_size: int,
        hidden_size: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        image_size: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch_size={patch_size}")
        if hidden_size % heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by heads={heads}")
        self.p, self.c, self.hidden, self.grid = (
            patch_size,
            in_channels,
            hidden_size,
            image_size // patch_size,
        )
        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos", _sincos_2d(hidden_size, self.grid)[None], persistent=False)
        self.time_embed = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size * patch_size * in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h != self.grid * self.p or w != self.grid * self.p:
            raise ValueError(
                f"input {tuple(x.shape)}: DiT was built for {self.grid * self.p}x{self.grid * self.p}"
            )
        tok = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        c = self.time_embed(timestep_embedding(t.expand(b) if t.numel() == 1 else t, self.hidden))
        for blk in self.blocks:
            tok = blk(tok, c)
        out = self.final(tok, c)  # (B, N, p*p*C)
        g, p = self.grid, self.p
        out = out.reshape(b, g, g, p, p, self.c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.c, g * p, g * p)
