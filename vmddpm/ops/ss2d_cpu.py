"""A whole SS2D (CSM) block as one autograd op on CPU, around the fused numba scan.

Why: written as modules, the block is ~45 dispatcher ops forward and ~180 backward (each linear's
autograd backward alone is ~20 ops of transposes, views and `resolve_conj`; every view, permute,
chunk and `-exp(A_logs)` adds a node), and its eleven parameter tensors added ~90 more in
`AccumulateGrad` and the optimizer. Here the forward is the kernels the block needs (the input and
x projections, the depth-wise conv, the scan, LayerNorm, the gate, the output projection) and the
backward is written out with the matching aten backward kernels, on the block's one flat weight
tensor (`vmddpm/ops/ss2d_layout.py`). Layout changes are single `as_strided` views (a `permute` or
`t()` is two or three dispatcher ops), and what only the numba scan reads (dt projection, bias, D,
and the flat gradient's assembly) stays in numpy views of the same memory, outside the dispatcher.

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
import torch.nn.functional as F

from vmddpm.ops.csm_cpu import numpy_view, scan_backward, scan_forward
from vmddpm.ops.ss2d_layout import PARTS, SS2DLayout, row_major_strides

aten = torch.ops.aten


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


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) `t` as (B*H*W, C) tokens: a view of a channels_last map, else a copy."""
    b, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((b * h * w, c), (c, 1), t.storage_offset())
    buf = torch.empty((b, h, w, c), dtype=t.dtype)
    buf.copy_(_permute(t, (0, 2, 3, 1)))
    return _rows(buf, (b * h * w, c))


def _scan_arrays(
    weights: torch.Tensor,
    u: torch.Tensor,
    x_dbl: torch.Tensor,
    a: torch.Tensor,
    layout: SS2DLayout,
    batch: int,
) -> tuple[np.ndarray, ...]:
    """The numba scan's inputs (u, x_dbl, dt_weight, dt_bias, A, D) as numpy views: the tokens and their
    projections from (B*L, .) tensors, the scan's own weights straight from the flat weight tensor."""
    wn = numpy_view(weights)
    k, d, length = layout.k, layout.d_inner, u.shape[0] // batch

    def part(name: str, shape: tuple[int, ...]) -> np.ndarray:
        at = layout.offsets[name]
        return wn[at : at + math.prod(shape)].reshape(shape)

    return (
        numpy_view(u).reshape(batch, length, d),
        numpy_view(x_dbl).reshape(batch, length, k, -1),
        part("dt_projs_weight", (k, d, layout.dt_rank)),
        part("dt_projs_bias", (k, d)),
        numpy_view(a),
        part("Ds", (k, d)),
    )


def _forward(
    x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, layout: SS2DLayout
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
    """The block's output, the tensors its backward reads, and the scan's channel block size."""
    b, c, h, wd = x.shape
    ln, d, k, n, r = h * wd, layout.d_inner, layout.k, layout.d_state, layout.dt_rank
    bl, p = b * ln, r + 2 * n
    off = layout.offsets
    in_t = _t(_rows(weights, (2 * d, c), off["in_proj.weight"]))  # (c, 2d)
    xproj_t = _t(_rows(weights, (k * p, d), off["x_proj_weight"]))  # (d, K*P)
    out_t = _t(_rows(weights, (c, d), off["out_proj.weight"]))  # (d, c)
    conv_w = _rows(weights, (d, 1, layout.d_conv, layout.d_conv), off["conv2d.weight"])
    conv_b, ln_w, ln_b = (
        _rows(weights, (d,), off[f]) for f in ("conv2d.bias", "out_norm.weight", "out_norm.bias")
    )
    a = torch.exp(_rows(weights, (k, d, n), off["A_logs"])).neg_()  # A = -exp(A_logs)

    xt = _channel_last(x)  # (B*L, c) tokens
    xz = torch.mm(xt, in_t)  # (B*L, 2d): [x | z]
    # the conv's input: the x half as a channels_last (B, d, H, W) map (one copy)
    xi = torch.empty((b, h, wd, d), dtype=x.dtype)
    xi.copy_(xz.as_strided((b, h, wd, d), (ln * 2 * d, wd * 2 * d, 2 * d, 1), xz.storage_offset()))
    xi = _permute(xi, (0, 3, 1, 2))
    pre = F.conv2d(xi, conv_w, conv_b, padding=layout.d_conv // 2, groups=d)
    u = _channel_last(F.silu(pre))  # (B*L, d)
    x_dbl = torch.mm(u, xproj_t)  # (B*L, K*P)

    y_np, ckpt_np, blk = scan_forward(_scan_arrays(weights, u, x_dbl, a, layout, b), numpy_view(idx))
    y, ckpt = torch.from_numpy(y_np), torch.from_numpy(ckpt_np)  # y: (B, L, d)

    yn, mean, rstd = aten.native_layer_norm(y, [d], ln_w, ln_b, layout.norm_eps)
    z = xz.as_strided((b, ln, d), (ln * 2 * d, 2 * d, 1), xz.storage_offset() + d)
    g = F.silu(z)
    yg = yn * g
    out = torch.mm(_rows(yg, (bl, d)), out_t)  # (B*L, c)
    saved = (
        weights, in_t, xproj_t, out_t, conv_w, ln_w, ln_b, a, idx, ckpt,
        xt, z, xi, pre, u, x_dbl, y, mean, rstd, yn, g, yg,
    )  # fmt: skip
    return _permute(_rows(out, (b, h, wd, c)), (0, 3, 1, 2)), saved, blk


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
            weights, in_t, xproj_t, out_t, conv_w, ln_w, ln_b, a, idx, ckpt,
            xt, z, xi, pre, u, x_dbl, y, mean, rstd, yn, g, yg,
        ) = ctx.saved_tensors  # fmt: skip
        layout: SS2DLayout = ctx.layout
        b, c, h, wd = ctx.shape
        ln, d = h * wd, layout.d_inner
        bl = b * ln
        grads: dict[str, np.ndarray] = {}
        keep = []  # tensors whose memory the numpy views in `grads` point into

        def put(name: str, t: torch.Tensor) -> None:
            keep.append(t)
            grads[name] = numpy_view(t)

        go = _channel_last(gout)  # (B*L, c), contiguous: both matmuls read it
        put("out_proj.weight", torch.mm(_t(go), _rows(yg, (bl, d))))
        dyg = _rows(torch.mm(go, _t(out_t)), (b, ln, d))
        dz = aten.silu_backward(dyg * yn, z)
        dy, dln_w, dln_b = aten.native_layer_norm_backward(
            dyg * g, y, [d], mean, rstd, ln_w, ln_b, [True, True, True]
        )
        put("out_norm.weight", dln_w)
        put("out_norm.bias", dln_b)

        arrays = _scan_arrays(weights, u, x_dbl, a, layout, b)
        du_np, dxd_np, grads["dt_projs_weight"], grads["dt_projs_bias"], da, grads["Ds"] = scan_backward(
            arrays, numpy_view(idx), numpy_view(ckpt), numpy_view(dy.contiguous()), ctx.blk
        )
        grads["A_logs"] = np.multiply(da, numpy_view(a), out=da)  # d(-exp(A_logs)) = A dA_logs
        dxd = torch.from_numpy(dxd_np.reshape(bl, -1))
        put("x_proj_weight", torch.mm(_t(dxd), u))
        du = torch.from_numpy(du_np.reshape(bl, d)).addmm_(dxd, _t(xproj_t))
        dpre = aten.silu_backward(_permute(_rows(du, (b, h, wd, d)), (0, 3, 1, 2)), pre)
        dxi, dconv_w, dconv_b = aten.convolution_backward(
            dpre, xi, conv_w, [d], [1, 1], [layout.d_conv // 2] * 2, [1, 1], False, [0, 0], d,
            [True, True, True],
        )  # fmt: skip
        put("conv2d.weight", dconv_w)
        put("conv2d.bias", dconv_b)
        dxz = torch.cat([_channel_last(dxi), _rows(dz, (bl, d))], dim=1)  # (B*L, 2d)
        put("in_proj.weight", torch.mm(_t(dxz), xt))
        dx = _permute(_rows(torch.mm(dxz, _t(in_t)), (b, h, wd, c)), (0, 3, 1, 2))
        dweights = np.concatenate([grads[name].reshape(-1) for name in PARTS])
        return dx, torch.from_numpy(dweights), None, None


def ss2d_cpu(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, layout: SS2DLayout) -> torch.Tensor:
    """The SS2D block on (B, d_model, H, W) `x` with flat `weights` (`layout`) and scan tables `idx`
    (K, H*W); check `fused_applicable` first. Without autograd (sampling, `torch.no_grad`,
    `torch.inference_mode`) nothing is kept for a backward."""
    if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad):
        return _SS2DCpu.apply(x, weights, idx, layout)
    return _forward(x, weights, idx, layout)[0]
