"""Fused CPU kernels (numba) of the CSM block around its scan: the depth-wise conv + SiLU before
it, the LayerNorm + SiLU gate after it, each forward and backward.

Why: in the CSM (`vmddpm/nn/scan2d.py`) the in-projection's x half goes through a depth-wise
d_conv x d_conv conv with bias and a SiLU before the scan, and the scan's output through a
LayerNorm times SiLU(z) after it. As aten ops that is seven kernels forward and eight backward
(conv, silu, layer_norm, silu, mul; their backwards and the products feeding them), each one a pass
over a (B, H, W, d) map that has left the cache by the time the next one runs; at demo widths (16
channels) they cost about 1.5 ms per block, more than the block's scan forward. Here one pass does
each, on the channel-last tokens that the projections already produce (no layout conversion), with
the inner loops over contiguous channels (or whole map rows) so that LLVM vectorises them.

Same maths as `F.silu(F.conv2d(x, w, bias, padding=d_conv // 2, groups=d))` on the channels-first
map (cross-correlation, zero "same" padding, odd d_conv) and as `F.layer_norm(y, (d,), w, b, eps) *
F.silu(z)`; tests/test_nn.py checks the block against its module path in float64. Summation orders
differ from aten's, so float32 results agree to rounding, not bit for bit. Partial sums of the
weight gradients are per batch element (or per row block) and folded in a fixed order:
deterministic. This module imports numba at import time: import it only after checking that numba
is importable.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from vmddpm.ops.csm_kernels import FASTMATH, _sigmoid

# ------------------------------------------------------------------------- depth-wise conv + SiLU


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


# --------------------------------------------------------------------------- LayerNorm x SiLU gate
@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def norm_gate_fwd(y, z, w, b, eps):  # pragma: no cover - compiled
    """out = LayerNorm(y) * silu(z) over the last axis of (batch, T, d) y and z (eps of their dtype);
    also returns each token's mean and 1 / std (batch, T), what the backward needs besides y and z."""
    nb, nt, d = y.shape
    out = np.empty_like(y)
    mean = np.empty((nb, nt), dtype=y.dtype)
    rstd = np.empty((nb, nt), dtype=y.dtype)
    zero = np.zeros(1, dtype=y.dtype)[0]
    one = np.ones(1, dtype=y.dtype)[0]
    inv_d = one / d
    for bb in prange(nb):
        for t in range(nt):
            yr = y[bb, t]
            zr = z[bb, t]
            o = out[bb, t]
            mu = zero
            for c in range(d):
                mu += yr[c]
            mu *= inv_d
            var = zero
            for c in range(d):
                var += (yr[c] - mu) * (yr[c] - mu)
            rs = one / np.sqrt(var * inv_d + eps)
            mean[bb, t] = mu
            rstd[bb, t] = rs
            for c in range(d):
                o[c] = ((yr[c] - mu) * rs * w[c] + b[c]) * (zr[c] * _sigmoid(zr[c]))
    return out, mean, rstd


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def norm_gate_bwd(go, y, z, mean, rstd, w, b):  # pragma: no cover - compiled
    """Gradients of y, z (batch, T, d), w and b (d) from go = dL/d(out), recomputing the normalised
    y and the gate from what the forward kept."""
    nb, nt, d = y.shape
    dy = np.empty_like(y)
    dz = np.empty_like(z)
    dw_p = np.zeros((nb, d), dtype=y.dtype)
    db_p = np.zeros((nb, d), dtype=y.dtype)
    zero = np.zeros(1, dtype=y.dtype)[0]
    one = np.ones(1, dtype=y.dtype)[0]
    inv_d = one / d
    for bb in prange(nb):
        dwb = dw_p[bb]
        dbb = db_p[bb]
        yhat = np.empty(d, dtype=y.dtype)
        dyh = np.empty(d, dtype=y.dtype)
        for t in range(nt):
            yr = y[bb, t]
            zr = z[bb, t]
            gr = go[bb, t]
            dzr = dz[bb, t]
            mu = mean[bb, t]
            rs = rstd[bb, t]
            s1 = zero  # sum of dL/dyhat
            s2 = zero  # sum of dL/dyhat * yhat
            for c in range(d):
                yh = (yr[c] - mu) * rs
                s = _sigmoid(zr[c])
                gyn = gr[c] * (zr[c] * s)  # dL/d(LayerNorm(y))
                dzr[c] = gr[c] * (yh * w[c] + b[c]) * s * (one + zr[c] * (one - s))
                dwb[c] += gyn * yh
                dbb[c] += gyn
                yhat[c] = yh
                dyh[c] = gyn * w[c]
                s1 += dyh[c]
                s2 += dyh[c] * yh
            s1 *= inv_d
            s2 *= inv_d
            dr = dy[bb, t]
            for c in range(d):
                dr[c] = rs * (dyh[c] - s1 - yhat[c] * s2)
    dw = dw_p[0].copy()
    db = db_p[0].copy()
    for bb in range(1, nb):
        dw += dw_p[bb]
        db += db_p[bb]
    return dy, dz, dw, db
