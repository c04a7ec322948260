"""Where each weight of an SS2D (CSM) block sits in the block's one flat parameter tensor.

Why one tensor per block: every parameter tensor costs a fixed toll per training step whatever its
size: an `AccumulateGrad` node in the backward and, in torch's fused AdamW on CPU, seven dispatcher
ops (the step counter's increment and its read-back); the EMA update and `zero_grad` visit each one
too. VMamba's SS2D has eleven small tensors, so the paper-sized network (44 blocks) had 842
parameter tensors against the attention U-Net's 304, and their bookkeeping was a quarter of its
training step's ops. Packed, a block is one tensor; `split` hands the network differentiable views
(one `split` in the forward, one `cat` in the backward) and the fused CPU op
(`vmddpm/ops/ss2d_cpu.py`) reads plain views and writes its gradient in one piece.

The names are VMamba's and the state dict still uses them (`vmddpm/nn/scan2d.py` converts on save
and load), so checkpoints are the same files with or without the packing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

PARTS: tuple[str, ...] = (
    "x_proj_weight",
    "dt_projs_weight",
    "dt_projs_bias",
    "A_logs",
    "Ds",
    "in_proj.weight",
    "conv2d.weight",
    "conv2d.bias",
    "out_norm.weight",
    "out_norm.bias",
    "out_proj.weight",
)
"""The block's weights in packing order: the order of VMamba's state dict (own parameters first,
then those of in_proj, conv2d, out_norm and out_proj)."""


@dataclasses.dataclass(frozen=True)
class SS2DLayout:
    """Shapes of an SS2D block's weights (K = 4 scan directions) and their offsets in the flat tensor."""

    d_model: int
    d_inner: int
    d_state: int
    dt_rank: int
    d_conv: int
    k: int = 4
    norm_eps: float = 1e-5  # nn.LayerNorm's default: what VMamba's out_norm uses

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        k, d, n, r, c = self.k, self.d_inner, self.d_state, self.dt_rank, self.d_model
        return {
            "x_proj_weight": (k, r + 2 * n, d),
            "dt_projs_weight": (k, d, r),
            "dt_projs_bias": (k, d),
            "A_logs": (k * d, n),
            "Ds": (k * d,),
            "in_proj.weight": (2 * d, c),
            "conv2d.weight": (d, 1, self.d_conv, self.d_conv),
            "conv2d.bias": (d,),
            "out_norm.weight": (d,),
            "out_norm.bias": (d,),
            "out_proj.weight": (c, d),
        }

    @functools.cached_property
    def sizes(self) -> list[int]:
        return [math.prod(self.shapes[name]) for name in PARTS]

    @functools.cached_property
    def offsets(self) -> dict[str, int]:
        """Where each weight starts in the flat tensor (elements)."""
        out, at = {}, 0
        for name, size in zip(PARTS, self.sizes, strict=True):
            out[name] = at
            at += size
        return out

    def pack(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """One flat tensor from the named weights (any of them missing or misshapen: ValueError)."""
        wrong = [n for n in PARTS if n not in parts or tuple(parts[n].shape) != self.shapes[n]]
        if wrong:
            got = {n: tuple(parts[n].shape) if n in parts else None for n in wrong}
            raise ValueError(f"SS2D weights missing or of the wrong shape: {got}; expected {self.shapes}")
        return torch.cat([parts[name].detach().reshape(-1) for name in PARTS])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named, differentiable views of `flat` (their gradients come back as one `cat`)."""
        chunks = flat.split(self.sizes)
        return {name: c.view(self.shapes[name]) for name, c in zip(PARTS, chunks, strict=True)}

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of `flat` (a weight tensor or its gradient) for code outside autograd: one
        `as_strided` each, so a state dict or the fused op's forward costs no split and no copy."""
        base = flat.storage_offset()
        return {
            name: flat.as_strided(shape, row_major_strides(shape), base + self.offsets[name])
            for name, shape in self.shapes.items()
        }


def row_major_strides(shape: Sequence[int]) -> list[int]:
    """The strides of a contiguous (row-major) tensor of `shape`."""
    return [math.prod(shape[i + 1 :]) for i in range(len(shape))]
