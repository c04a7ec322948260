"""A whole SS2D (CSM) block as one autograd op on CPU, around the fused numba scan.

Why: written as modules, the block is ~45 dispatcher ops forward and ~180 backward (each linear's
autograd backward alone is ~20 ops of transposes, views and `resolve_conj`; every view, permute,
chunk and `-exp(A_logs)` adds a node), and its eleven parameter tensors added ~90 more in
`AccumulateGrad` and the optimizer. Here the block is the kernels it needs, forward and backward,
on its one flat weight tensor (`vmddpm/ops/ss2d_layout.py`): the projections are BLAS products
(batched over the B maps, so that the NCHW map in and out and the channel-last tokens inside meet
as transposed operands, never as a permuting copy), and the rest are numba kernels on the tokens:
depth-wise conv + SiLU and LayerNorm x SiLU gate (`vmddpm/ops/block_kernels.py`), the scan
(`vmddpm/ops/csm_kernels.py`). Views are single `as_strided` calls (a `permute` or `t()` is two or
three dispatcher ops), and what only the kernels read (the small weights, the flat gradient's
assembly) stays in numpy views of the same memory, outside the dispatcher.

Same maths as the module path of `vmddpm/nn/scan2d.py` (`SS2D.forward_modules`), which stays the
definition and every other case's path; tests/test_nn.py checks the output and every gradient
against it. Used for float32/float64 CPU tensors without autocast and with an odd `d_conv`
(symmetric "same" padding): `fused_applicable`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vmddpm.ops.csm_cpu import numpy_view, scan_backward, scan_forward
from vmddpm.ops.selective_scan import numba_region
from vmddpm.ops.ss2d_layout import PARTS, SS2DLayout, row_major_strides


def fused_applicable(x: torch.Tensor, weights: torch.Tensor, layout: SS2DLayout) -> bool:
    """Whether `ss2d_cpu` computes what the module path would for these inputs."""
    return (
        x.device.type == "cpu"
        and x.dtype == weights.dtype
        and x.dtype in (torch.float32, torch.float64)
        and weights.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and layout.d_conv % 2 == 1
    )


def _permute(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """`t.permute(dims)` as one `as_strided` (a permute is two dispatcher ops)."""
    return t.as_strided([t.shape[i] for i in dims], [t.stride(i) for i in dims], t.storage_offset())


def _t(a: torch.Tensor) -> torch.Tensor:
    """`a.t()` as one `as_strided` (`t` is three dispatcher ops: t, transpose, as_strided)."""
    return _permute(a, (1, 0))


def _rows(t: torch.Tensor, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
    """A row-major view of `shape` into `t`'s memory (made contiguous first if it is not), `offset`
    elements in."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.as_strided(shape, row_major_strides(shape), t.storage_offset() + offset)


def _maps(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) `t` as (B, C, H*W) rows, one per channel: a view when each channel's map is
    contiguous (an NCHW map, or a channel slice of one such as a concatenation's gradient), else a
    copy."""
    b, c, h, w = t.shape
    if not ((w == 1 or t.stride(3) == 1) and (h == 1 or t.stride(2) == w)):
        t = t.contiguous()
    return t.as_strided((b, c, h * w), (t.stride(0), t.stride(1), 1), t.storage_offset())


def _batched(m: torch.Tensor, batch: int) -> torch.Tensor:
    """Matrix `m` (any strides) as a (batch, *m.shape) stack of itself without a copy (stride 0), the
    shared operand of a `bmm`."""
    return m.as_strided((batch, *m.shape), (0, *m.stride()), m.storage_offset())


def _part(wn: np.ndarray, layout: SS2DLayout, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Weight `name` of the block in `shape`, a view of `wn` (the flat weight tensor as numpy)."""
    at = layout.offsets[name]
    return wn[at : at + math.prod(shape)].reshape(shape)


def _conv_arrays(wn: np.ndarray, layout: SS2DLayout) -> tuple[np.ndarray, np.ndarray]:
    """The depth-wise conv's weight (d, k, k) and bias (d) as numpy views, for `block_kernels`."""
    d, kc = layout.d_inner, layout.d_conv
    return _part(wn, layout, "conv2d.weight", (d, kc, kc)), _part(wn, layout, "conv2d.bias", (d,))


def _norm_arrays(wn: np.ndarray, layout: SS2DLayout) -> tuple[np.ndarray, np.ndarray]:
    """The output LayerNorm's weight and bias (d,) as numpy views, for `block_kernels`."""
    d = layout.d_inner
    return _part(wn, layout, "out_norm.weight", (d,)), _part(wn, layout, "out_norm.bias", (d,))


def _scan_arrays(
    wn: np.ndarray,
    u: torch.Tensor,
    x_dbl: torch.Tensor,
    a: torch.Tensor,
    layout: SS2DLayout,
    batch: int,
) -> tuple[np.ndarray, ...]:
    """The numba scan's inputs (u, x_dbl, dt_weight, dt_bias, A, D) as numpy views: the tokens and their
    projections from (B*L, .) tensors, the scan's own weights straight from the flat weight tensor."""
    k, d, length = layout.k, layout.d_inner, u.shape[0] // batch
    return (
        numpy_view(u).reshape(batch, length, d),
        numpy_view(x_dbl).reshape(batch, length, k, -1),
        _part(wn, layout, "dt_projs_weight", (k, d, layout.dt_rank)),
        _part(wn, layout, "dt_projs_bias", (k, d)),
        numpy_view(a),
        _part(wn, layout, "Ds", (k, d)),
    )


def _forward(
    x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, layout: SS2DLayout
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
    """The block's output, the tensors its backward reads, and the scan's channel block size."""
    from vmddpm.ops.block_kernels import dwconv_silu_fwd, norm_gate_fwd

    b, c, h, wd = x.shape
    ln, d, k, n, r = h * wd, layout.d_inner, layout.k, layout.d_state, layout.dt_rank
    bl, p = b * ln, r + 2 * n
    off = layout.offsets
    in_x = _rows(weights, (d, c), off["in_proj.weight"])  # in_proj's x rows (d, c), then its z rows
    in_z = _rows(weights, (d, c), off["in_proj.weight"] + d * c)
    xproj_t = _t(_rows(weights, (k * p, d), off["x_proj_weight"]))  # (d, K*P)
    out_w = _rows(weights, (c, d), off["out_proj.weight"])
    a = torch.exp(_rows(weights, (k, d, n), off["A_logs"])).neg_()  # A = -exp(A_logs)
    wn = numpy_view(weights)

    # The block reads and writes NCHW maps, the kernels work on channel-last tokens: the layout
    # change is the projections' own transposed operands (batched products over the B maps), not a
    # copy (a permuting copy and a product took 2.4x the time of the one transposed product).
    xt = _permute(_maps(x), (0, 2, 1))  # (B, L, c), a view
    # x and z as two products, each contiguous: x's tokens are the conv kernel's input as they
    # stand, and the gate's element-wise ops run on dense memory (on a strided half of one
    # (B*L, 2d) product they were 3x slower)
    xi = torch.bmm(xt, _batched(_t(in_x), b))  # (B, L, d) = (B, H, W, d)
    z = torch.bmm(xt, _batched(_t(in_z), b))
    with numba_region():
        pre_np, u_np = dwconv_silu_fwd(numpy_view(xi).reshape(b, h, wd, d), *_conv_arrays(wn, layout))
    pre, u = torch.from_numpy(pre_np), torch.from_numpy(u_np.reshape(bl, d))
    x_dbl = torch.mm(u, xproj_t)  # (B*L, K*P)

    y_np, ckpt_np, blk = scan_forward(_scan_arrays(wn, u, x_dbl, a, layout, b), numpy_view(idx))
    with numba_region():  # LayerNorm(y) * silu(z)
        yg_np, mean_np, rstd_np = norm_gate_fwd(
            y_np, numpy_view(z), *_norm_arrays(wn, layout), y_np.dtype.type(layout.norm_eps)
        )
    y, ckpt, yg = torch.from_numpy(y_np), torch.from_numpy(ckpt_np), torch.from_numpy(yg_np)
    mean, rstd = torch.from_numpy(mean_np), torch.from_numpy(rstd_np)
    out = torch.bmm(_batched(out_w, b), _permute(yg, (0, 2, 1)))  # (B, c, L): an NCHW map
    saved = (
        weights, in_x, in_z, xproj_t, out_w, a, idx, ckpt, xt, z, xi, pre, u, x_dbl, y, mean, rstd, yg,
    )  # fmt: skip
    return _rows(out, (b, c, h, wd)), saved, blk


class _SS2DCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, layout: SS2DLayout):  # type: ignore[override]
        out, saved, blk = _forward(x, weights, idx, layout)
        ctx.save_for_backward(*saved)
        ctx.layout, ctx.blk, ctx.shape = layout, blk, tuple(x.shape)
        return out

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor):  # type: ignore[override]
        (
            weights, in_x, in_z, xproj_t, out_w, a, idx, ckpt, xt, z, xi, pre, u, x_dbl, y, mean, rstd, yg,
        ) = ctx.saved_tensors  # fmt: skip
        from vmddpm.ops.block_kernels import dwconv_silu_bwd, norm_gate_bwd

        wn = numpy_view(weights)
        layout: SS2DLayout = ctx.layout
        b, c, h, wd = ctx.shape
        ln, d = h * wd, layout.d_inner
        bl = b * ln
        grads: dict[str, np.ndarray] = {}
        keep = []  # tensors whose memory the numpy views in `grads` point into

        def put(name: str, t: torch.Tensor) -> None:
            keep.append(t)
            grads[name] = numpy_view(t)

        go = _maps(gout)  # (B, c, L)
        put("out_proj.weight", torch.bmm(go, yg).sum(0))
        dyg = torch.bmm(_permute(go, (0, 2, 1)), _batched(out_w, b))  # (B, L, d)
        with numba_region():
            dy, dz, grads["out_norm.weight"], grads["out_norm.bias"] = norm_gate_bwd(
                numpy_view(dyg), numpy_view(y), numpy_view(z),
                numpy_view(mean), numpy_view(rstd), *_norm_arrays(wn, layout),
            )  # fmt: skip

        arrays = _scan_arrays(wn, u, x_dbl, a, layout, b)
        du_np, dxd_np, grads["dt_projs_weight"], grads["dt_projs_bias"], da, grads["Ds"] = scan_backward(
            arrays, numpy_view(idx), numpy_view(ckpt), dy, ctx.blk
        )
        grads["A_logs"] = np.multiply(da, numpy_view(a), out=da)  # d(-exp(A_logs)) = A dA_logs
        dxd = torch.from_numpy(dxd_np.reshape(bl, -1))
        put("x_proj_weight", torch.mm(_t(dxd), u))
        du = torch.from_numpy(du_np.reshape(bl, d)).addmm_(dxd, _t(xproj_t))
        with numba_region():
            dxi_np, grads["conv2d.weight"], grads["conv2d.bias"] = dwconv_silu_bwd(
                numpy_view(xi).reshape(b, h, wd, d), _conv_arrays(wn, layout)[0],
                numpy_view(pre), numpy_view(du).reshape(b, h, wd, d),
            )  # fmt: skip
        dxi = _permute(torch.from_numpy(dxi_np.reshape(b, ln, d)), (0, 2, 1))  # (B, d, L)
        dz = _permute(torch.from_numpy(dz), (0, 2, 1))
        din = torch.empty((2 * d, c), dtype=dz.dtype)  # in_proj's gradient: x rows, then z rows
        torch.sum(torch.bmm(dxi, xt), 0, out=_rows(din, (d, c)))
        torch.sum(torch.bmm(dz, xt), 0, out=_rows(din, (d, c), d * c))
        put("in_proj.weight", din)
        dx = torch.bmm(_batched(_t(in_x), b), dxi).baddbmm_(_batched(_t(in_z), b), dz)  # (B, c, L)
        dx = _rows(dx, (b, c, h, wd))
        dweights = np.concatenate([grads[name].reshape(-1) for name in PARTS])
        return dx, torch.from_numpy(dweights), None, None


def ss2d_cpu(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, layout: SS2DLayout) -> torch.Tensor:
    """The SS2D block on (B, d_model, H, W) `x` with flat `weights` (`layout`) and scan tables `idx`
    (K, H*W); check `fused_applicable` first. Without autograd (sampling, `torch.no_grad`,
    `torch.inference_mode`) nothing is kept for a backward."""
    if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad):
        return _SS2DCpu.apply(x, weights, idx, layout)
    return _forward(x, weights, idx, layout)[0]
