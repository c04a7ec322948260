"""Fused CPU kernels (numba) of the CSM's depth-wise conv + SiLU, forward and backward.

Why: in the CSM (`vmddpm/nn/scan2d.py`) the in-projection's x half goes through a depth-wise
d_conv x d_conv conv with bias and a SiLU before the scan. As aten ops that is four kernels forward
and backward (conv, silu, silu_backward, convolution_backward), each one a pass over a (B, H, W, d)
map that has left the cache by the time the next one runs; at demo widths (16 channels) they cost
about a millisecond per block, as much as the block's scan forward. Here one pass does each
direction, on the channel-last tokens the projections already produce (no layout conversion), with
the inner loops over the contiguous channels so that LLVM vectorises them.

Same maths as `F.silu(F.conv2d(x, w, bias, padding=d_conv // 2, groups=d))` on the channels-first
map (cross-correlation, zero "same" padding, odd d_conv); tests/test_nn.py checks the block against
its module path in float64. Summation order differs from oneDNN's, so float32 results agree to
rounding, not bit for bit. Layouts: x, pre, u, du, dx (batch, H, W, d) contiguous; w (d, k, k);
bias (d). This module imports numba at import time: import it only after checking that numba is
importable.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from vmddpm.ops.csm_kernels import FASTMATH, _sigmoid


@njit(cache=True)
def _tiled_taps(w, wd):  # pragma: no cover - compiled
    """(d, k, k) weights as (k, k, wd * d): each tap's channel vector repeated along a map row, so
    that a tap's contribution to a whole row is one flat loop over the row's (W, d) elements."""
    d, k = w.shape[0], w.shape[1]
    wt = np.empty((k, k, wd * d), dtype=w.dtype)
    for i in range(k):
        for j in range(k):
            for q in range(wd):
                for c in range(d):
                    wt[i, j, q * d + c] = w[c, i, j]
    return wt


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def dwconv_silu_fwd(x, w, bias):  # pragma: no cover - compiled
    """pre = depth-wise conv(x) + bias and u = silu(pre), both (batch, H, W, d); rows in parallel.

    Row i of the output gathers tap (di, dj) from input row i + di - r shifted by dj - r pixels: in
    the flat (W * d) row that is one contiguous span of each, so every loop below is a long,
    branch-free loop that vectorises."""
    nb, h, wd, d = x.shape
    k = w.shape[1]
    r = k // 2
    wt = _tiled_taps(w, wd)
    xf = x.reshape(nb, h, wd * d)
    pre = np.empty_like(xf)
    u = np.empty_like(xf)
    for t in prange(nb * h):
        b = t // h
        i = t % h
        acc = pre[b, i]
        for j in range(wd):
            row = acc[j * d : (j + 1) * d]
            for c in range(d):
                row[c] = bias[c]
        for di in range(max(0, r - i), min(k, h + r - i)):
            xrow = xf[b, i + di - r]
            for dj in range(k):
                lo, hi = max(0, r - dj), min(wd, wd + r - dj)  # output pixels this tap reaches
                a = acc[lo * d : hi * d]
                ws = wt[di, dj, lo * d : hi * d]
                xs = xrow[(lo + dj - r) * d : (hi + dj - r) * d]
                for q in range(a.shape[0]):
                    a[q] += ws[q] * xs[q]
        ur = u[b, i]
        for q in range(wd * d):
            ur[q] = acc[q] * _sigmoid(acc[q])
    return pre.reshape(x.shape), u.reshape(x.shape)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def dwconv_silu_bwd(x, w, pre, du):  # pragma: no cover - compiled
    """Gradients of x (batch, H, W, d), w (d, k, k) and bias (d) from du = dL/du. Batch elements in
    parallel, each writing its own partial of dw and dbias that a serial pass sums (deterministic)."""
    nb, h, wd, d = x.shape
    k = w.shape[1]
    r = k // 2
    n = wd * d
    wt = _tiled_taps(w, wd)
    xf = x.reshape(nb, h, n)
    pf = pre.reshape(nb, h, n)
    uf = du.reshape(nb, h, n)
    dpre = np.empty_like(xf)
    dx = np.zeros_like(xf)
    dw_p = np.zeros((nb, k, k, n), dtype=x.dtype)  # per batch element, still tiled along the row
    db_p = np.zeros((nb, n), dtype=x.dtype)
    one = np.ones(1, dtype=x.dtype)[0]
    for b in prange(nb):
        dbb = db_p[b]
        for i in range(h):  # dL/dpre through silu' = s (1 + pre (1 - s))
            pr = pf[b, i]
            ur = uf[b, i]
            gr = dpre[b, i]
            for q in range(n):
                s = _sigmoid(pr[q])
                gr[q] = ur[q] * s * (one + pr[q] * (one - s))
                dbb[q] += gr[q]
        for i in range(h):  # output row i took tap (di, dj) from input row i + di - r
            gr = dpre[b, i]
            for di in range(max(0, r - i), min(k, h + r - i)):
                ii = i + di - r
                xrow = xf[b, ii]
                dxrow = dx[b, ii]
                for dj in range(k):
                    lo, hi = max(0, r - dj), min(wd, wd + r - dj)
                    g = gr[lo * d : hi * d]
                    ws = wt[di, dj, lo * d : hi * d]
                    dws = dw_p[b, di, dj, lo * d : hi * d]
                    xs = xrow[(lo + dj - r) * d : (hi + dj - r) * d]
                    dxs = dxrow[(lo + dj - r) * d : (hi + dj - r) * d]
                    for q in range(g.shape[0]):
                        dxs[q] += ws[q] * g[q]
                        dws[q] += g[q] * xs[q]
    # fold the batch partials (flat loops, in batch order: deterministic), then the row tiling
    dwf = dw_p.reshape(nb, k * k * n)
    tot = dwf[0].copy()
    dbt = db_p[0].copy()
    for b in range(1, nb):
        wb = dwf[b]
        bb = db_p[b]
        for q in range(k * k * n):
            tot[q] += wb[q]
        for q in range(n):
            dbt[q] += bb[q]
    dw = np.zeros_like(w)
    dbias = np.zeros(d, dtype=x.dtype)
    for j in range(wd):
        for c in range(d):
            dbias[c] += dbt[j * d + c]
            for t in range(k * k):
                dw[c, t // k, t % k] += tot[t * n + j * d + c]
    return dx.reshape(x.shape), dw, dbias
