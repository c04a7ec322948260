"""`csm_scan` on CPU: the fused numba kernels of `vmddpm/ops/csm_kernels.py` as an autograd op.

The kernels compute in float32 (float64 when an input is float64); other input dtypes are cast once
on the way in and the output once on the way out, as mamba-ssm does. Parallel over batch x channel
blocks on numba's threads, sized to torch's intra-op pool (a Snakemake job given one thread keeps
one thread).

The tensors reach numba as numpy views of their memory made through numpy's array interface rather
than through `Tensor.numpy()`: the latter costs four dispatcher ops per tensor (detach, resolve_conj,
...), which over the ~40 CSM blocks of the paper-sized network was a third of a training step's op
count. (A ctypes pointer cast, the first way, took 4 us a view: ~2 ms of a demo-width step.)
"""

from __future__ import annotations

import numpy as np
import torch

from vmddpm.ops.selective_scan import numba_region

CSM_CHUNK = 32
"""Steps between the state checkpoints of the forward (a kernel tile, not a model knob): the
backward recomputes at most this many steps per chunk and keeps their states and decays, 2 x CHUNK
x N x BLOCK floats per thread (512 KiB at N = 16, BLOCK = 128), about a core's L2."""

CSM_BLOCK = 128
"""Channels per parallel unit: the vectorised inner loops run over a block, so longer is faster per
update (0.49 against 0.95 ns at 64 channels, paper widths, one thread); halved while the batch alone
leaves threads idle."""

_TYPESTR = {
    dt: np.dtype(npt).str
    for dt, npt in ((torch.float32, np.float32), (torch.float64, np.float64), (torch.int64, np.int64))
}


class _Memory:
    """Numpy's array interface onto a contiguous tensor's memory (numpy keeps this object, not the
    tensor, as the view's base: the caller keeps the tensor alive)."""

    __slots__ = ("__array_interface__",)

    def __init__(self, t: torch.Tensor) -> None:
        self.__array_interface__ = {
            "data": (t.data_ptr(), False),
            "shape": tuple(t.shape),
            "typestr": _TYPESTR[t.dtype],
            "version": 3,
        }


def _blocks_for(batch: int, dim: int, threads: int) -> int:
    """Channel block size: CSM_BLOCK, halved (down to 16) while batch x blocks leaves threads idle."""
    blk = min(dim, CSM_BLOCK)
    while blk > 16 and batch * -(-dim // blk) < threads:
        blk //= 2
    return blk


def _as_array(t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
    """A numpy view of `t` as a contiguous `dtype` tensor, and the tensor that owns the memory (keep it
    alive as long as the view). Converts only when needed."""
    if t.dtype != dtype or not t.is_contiguous():
        t = t.detach().to(dtype).contiguous()
    if t.numel() == 0:
        return np.zeros(tuple(t.shape), dtype=_TYPESTR[dtype]), t
    return np.asarray(_Memory(t)), t


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The kernels' dtype for these inputs: float64 when one is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of contiguous float32/float64/int64 `t` (no dispatcher op, no copy): for code
    that hands tensors to the kernels and must keep `t` alive while the view is used."""
    if not t.is_contiguous() or t.dtype not in _TYPESTR:
        raise ValueError(f"numpy_view needs a contiguous float32/float64/int64 tensor, got {t.dtype}")
    return _as_array(t, t.dtype)[0]


def scan_forward(arrays: tuple[np.ndarray, ...], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The forward kernel on numpy (u, x_dbl, dt_weight, dt_bias, A, D) of one dtype and `idx`:
    y (batch, L, d), the chunk-start states, and the channel block size it ran with."""
    from vmddpm.ops import csm_kernels

    with numba_region() as threads:
        blk = _blocks_for(arrays[0].shape[0], arrays[0].shape[2], threads)
        y, ckpt = csm_kernels.csm_fwd(*arrays, idx, CSM_CHUNK, blk)
    return y, ckpt, blk


def scan_backward(
    arrays: tuple[np.ndarray, ...], idx: np.ndarray, ckpt: np.ndarray, gy: np.ndarray, blk: int
) -> tuple[np.ndarray, ...]:
    """The backward kernel: gradients of (u, x_dbl, dt_weight, dt_bias, A, D), each in its input's
    layout, from `gy` and what `scan_forward` returned."""
    from vmddpm.ops import csm_kernels

    with numba_region():
        return csm_kernels.csm_bwd(*arrays, idx, ckpt, gy, CSM_CHUNK, blk)


def csm_forward(
    floats: tuple[torch.Tensor, ...], idx: torch.Tensor, cdt: torch.dtype
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
    """`scan_forward` on tensors (u, x_dbl, dt_weight, dt_bias, A, D), cast to `cdt` where needed.

    Returns y (batch, L, d) in `cdt`, the tensors the backward needs (the inputs as `cdt`-contiguous
    tensors, `idx`, the chunk-start states) and the channel block size it ran with."""
    views = [_as_array(t, cdt) for t in floats]
    idx_np, idx_t = _as_array(idx, torch.int64)
    y, ckpt, blk = scan_forward(tuple(a for a, _ in views), idx_np)
    return torch.from_numpy(y), (*(t for _, t in views), idx_t, torch.from_numpy(ckpt)), blk


def csm_backward(
    saved: tuple[torch.Tensor, ...], gy: torch.Tensor, blk: int, cdt: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """`scan_backward` on what `csm_forward` returned for the backward; gradients in `cdt`."""
    *floats, idx_t, ckpt = saved
    arrays = tuple(_as_array(t, cdt)[0] for t in floats)
    gy_np, _gy = _as_array(gy, cdt)
    grads = scan_backward(arrays, numpy_view(idx_t), numpy_view(ckpt), gy_np, blk)
    return tuple(torch.from_numpy(g) for g in grads)


class _CsmScanCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, x_dbl, dt_weight, dt_bias, A, D, idx):  # type: ignore[override]
        floats = (u, x_dbl, dt_weight, dt_bias, A, D)
        cdt = compute_dtype(*floats)
        y, saved, blk = csm_forward(floats, idx, cdt)
        # Everything the backward reads goes through save_for_backward, never as arrays kept on ctx:
        # under activation checkpointing the saved tensors are dropped after the forward and
        # recomputed for the backward (new memory), and autograd's version check guards in-place edits.
        ctx.save_for_backward(*saved)
        ctx.blk, ctx.cdt = blk, cdt
        ctx.dtypes = tuple(t.dtype for t in floats)
        return y if u.dtype == cdt else y.to(u.dtype)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        grads = csm_backward(ctx.saved_tensors, gy, ctx.blk, ctx.cdt)
        out = [g if dtype == ctx.cdt else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (*out, None)


def csm_scan_cpu(
    u: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """`csm_scan` with the fused CPU kernels (CPU tensors; shapes checked by the caller)."""
    return _CsmScanCpu.apply(u, x_dbl, dt_weight, dt_bias, A, D, idx)
