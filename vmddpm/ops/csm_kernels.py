"""Fused CPU kernels (numba) of the Cross-Scan Module's S6 core, forward and backward.

The op is defined in `vmddpm/ops/cross_scan.py` (`csm_scan`); this module is its CPU
implementation. One kernel call does what VMamba's SS2D spreads over a dozen tensor passes: each
direction's tokens are read in place through the index table `idx` (cross-scan and Sequence
Regeneration cost nothing), the dt projection, softplus, the D skip and the cross-merge happen in
registers, and only `u`, `x_dbl` and `y` are full-size arrays.

Why this layout and loop order: a parallel unit is one batch element and one block of channels;
every step of a direction's sequence updates the (N, channels) state of that block with the inner
loop over channels, which are contiguous in the channel-last token arrays. That inner loop is long
(the block, not N = 4..16) and branch-free, so LLVM vectorises it; `exp` is the one call in it, and
glibc's `expf` is not vectorisable, so float32 uses `_exp`, a Cody-Waite range reduction with
Cephes' polynomial (about 1 ulp; inputs clamped to [-87.3, 88]: exp(-87.3) = 1.2e-38 stands in for
smaller values, which multiply a state by less than float32's smallest normal) and an exponent
built by bit cast: 4x faster per update than `math.exp` here. float64 (the tests' exact mode) uses
`math.exp` / `math.log1p`.

The backward does not invert the recurrence (dividing by exp(dt A) blows up when it is small): the
forward stores the state at the start of every chunk of `chunk` steps, and the backward recomputes
one chunk's states and decays from there, then walks it in reverse.

Layouts (contiguous numpy arrays of one float dtype): u, y (batch, L, d); xd (batch, L, K, R + 2N)
= [dt_low | B | C] per token and direction; w (K, d, R) the dt projection; bias, Dk (K, d); A
(K, d, N) the decays; idx (K, L) int64. This module imports numba at import
time: import it only after checking that numba is importable.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload


# ---------------------------------------------------------------------------- vectorisable maths
@intrinsic
def _bits_as_float32(typingctx, bits):  # pragma: no cover - compiled
    """Reinterpret an int32's bits as a float32 (an LLVM bitcast, which vectorises)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _exp(x):  # pragma: no cover - replaced by the overload below inside compiled code
    return math.exp(x)


def _log1p(x):  # pragma: no cover
    return math.log1p(x)


@overload(_exp, inline="always")
def _exp_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def exp32(x):
            x = min(max(x, np.float32(-87.33654)), np.float32(88.0))
            fx = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
            r = x - fx * np.float32(0.693359375) + fx * np.float32(2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * (r * r) + r + np.float32(1.0)
            return p * _bits_as_float32((np.int32(fx) + np.int32(127)) << np.int32(23))

        return exp32
    return lambda x: math.exp(x)


@overload(_log1p, inline="always")
def _log1p_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def log1p32(x):
            # valid for t in [0, 1] (softplus only needs log1p(exp(-|x|))): log1p(t) = 2 atanh(s),
            # s = t / (2 + t) <= 1/3, odd series to s^13 (truncation < 1e-8 relative)
            s = x / (np.float32(2.0) + x)
            s2 = s * s
            p = np.float32(1.0 / 13.0)
            p = p * s2 + np.float32(1.0 / 11.0)
            p = p * s2 + np.float32(1.0 / 9.0)
            p = p * s2 + np.float32(1.0 / 7.0)
            p = p * s2 + np.float32(1.0 / 5.0)
            p = p * s2 + np.float32(1.0 / 3.0)
            p = p * s2 + np.float32(1.0)
            return np.float32(2.0) * s * p

        return log1p32
    return lambda x: math.log1p(x)


def _softplus(x):  # pragma: no cover
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x):  # pragma: no cover
    return 1.0 / (1.0 + math.exp(-x))


@overload(_softplus, inline="always")
def _softplus_impl(x):
    zero = np.float32(0.0) if x.bitwidth == 32 else 0.0

    def softplus(x):  # log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)
        return max(x, zero) + _log1p(_exp(-abs(x)))

    return softplus


@overload(_sigmoid, inline="always")
def _sigmoid_impl(x):
    one = np.float32(1.0) if x.bitwidth == 32 else 1.0

    def sigmoid(x):
        return one / (one + _exp(-x))

    return sigmoid


def _softplus_sigmoid(x):  # pragma: no cover
    return _softplus(x), _sigmoid(x)


@overload(_softplus_sigmoid, inline="always")
def _softplus_sigmoid_impl(x):
    zero = np.float32(0.0) if x.bitwidth == 32 else 0.0
    one = np.float32(1.0) if x.bitwidth == 32 else 1.0

    def softplus_sigmoid(x):  # softplus and its derivative from one exp: t = e^-|x|
        t = _exp(-abs(x))
        return max(x, zero) + _log1p(t), (one if x >= zero else t) / (one + t)

    return softplus_sigmoid


FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
"""LLVM flags of the kernels: reassociation lets the channel sums (dB, dC and the dt projection's
gradient) vectorise, contraction allows FMAs. Not `nnan`/`ninf`: the clamps must see inf and NaN."""


# ------------------------------------------------------------------------------------ forward
# Inner loops index rows of the arrays (views such as u[b, j, d0:d1]) with the loop variable alone:
# an index like `d0 + d` makes numba emit a negative-index wraparound per access, which stops LLVM
# from vectorising the loop (2.5x slower per update here). Loop-invariant parameter rows are copied
# into small per-thread arrays once per direction.


@njit(inline="always")
def _params(w, bias, A, Dk, k, d0, m, w_k, bias_k, a_k, d_k):  # pragma: no cover - compiled
    """Copy direction k's parameters for channels [d0, d0 + m) into the per-thread arrays, channels
    last (w_k (R, m), a_k (N, m)) so that the inner loops run over contiguous channels."""
    for d in range(m):
        for r in range(w.shape[2]):
            w_k[r, d] = w[k, d0 + d, r]
        for s in range(A.shape[2]):
            a_k[s, d] = A[k, d0 + d, s]
    bias_k[:] = bias[k, d0 : d0 + m]
    d_k[:] = Dk[k, d0 : d0 + m]


@njit(inline="always")
def _delta(x, xdj, w_k, bias_k, nr, m):  # pragma: no cover - compiled
    """x = dt_bias + dt_weight @ dt_low for one token: the pre-softplus dt of every channel."""
    for d in range(m):
        x[d] = bias_k[d]
    for r in range(nr):
        xr = xdj[r]
        wr = w_k[r]
        for d in range(m):
            x[d] += wr[d] * xr


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def csm_fwd(u, xd, w, bias, A, Dk, idx, chunk, blk):  # pragma: no cover - compiled
    """Returns y (batch, L, d) and the chunk-start states (batch, K, n_chunks, N, d)."""
    nb, length, dm = u.shape
    nk, nr, n = idx.shape[0], w.shape[2], A.shape[2]
    nblk = (dm + blk - 1) // blk
    nc = (length + chunk - 1) // chunk
    y = np.zeros_like(u)
    ckpt = np.zeros((nb, nk, nc, n, dm), dtype=u.dtype)
    for i in prange(nb * nblk):
        b = i // nblk
        d0 = (i % nblk) * blk
        m = min(dm, d0 + blk) - d0
        w_k = np.empty((nr, m), dtype=u.dtype)
        bias_k = np.empty(m, dtype=u.dtype)
        a_k = np.empty((n, m), dtype=u.dtype)
        d_k = np.empty(m, dtype=u.dtype)
        h = np.zeros((n, m), dtype=u.dtype)
        x = np.empty(m, dtype=u.dtype)
        dt = np.empty(m, dtype=u.dtype)
        dtu = np.empty(m, dtype=u.dtype)
        acc = np.empty(m, dtype=u.dtype)
        for k in range(nk):
            _params(w, bias, A, Dk, k, d0, m, w_k, bias_k, a_k, d_k)
            h[:, :] = 0
            for c in range(nc):  # a chunk loop, not `p % chunk` per step (12% of the kernel)
                ckpt[b, k, c, :, d0 : d0 + m] = h
                for p in range(c * chunk, min(length, (c + 1) * chunk)):
                    j = idx[k, p]
                    xdj = xd[b, j, k]
                    uj = u[b, j, d0 : d0 + m]
                    _delta(x, xdj, w_k, bias_k, nr, m)
                    for d in range(m):
                        dt[d] = _softplus(x[d])
                    for d in range(m):
                        dtu[d] = dt[d] * uj[d]
                        acc[d] = d_k[d] * uj[d]
                    for s in range(n):
                        bs = xdj[nr + s]
                        cs = xdj[nr + n + s]
                        hs = h[s]
                        a_s = a_k[s]
                        for d in range(m):
                            hv = _exp(dt[d] * a_s[d]) * hs[d] + dtu[d] * bs
                            hs[d] = hv
                            acc[d] += cs * hv
                    yj = y[b, j, d0 : d0 + m]
                    for d in range(m):
                        yj[d] += acc[d]
    return y, ckpt


# ----------------------------------------------------------------------------------- backward
@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def csm_bwd(u, xd, w, bias, A, Dk, idx, ckpt, gy, chunk, blk):  # pragma: no cover - compiled
    """Gradients from gy (batch, L, d), each in its input's layout: du (batch, L, d), dxd (batch, L,
    K, R + 2N), dw (K, d, R), dbias (K, d), dA (K, d, N), dDk (K, d). The parallel units write partials
    (per channel block for dxd, per batch element for the parameters) that a serial pass then sums,
    so no two threads ever add into the same element (deterministic, no atomics)."""
    nb, length, dm = u.shape
    nk, nr, n = idx.shape[0], w.shape[2], A.shape[2]
    nblk = (dm + blk - 1) // blk
    nc = ckpt.shape[2]
    du = np.zeros_like(u)
    dxd_p = np.zeros((nblk, nb, length, nk, xd.shape[3]), dtype=u.dtype)
    dwT = np.zeros((nb, nk, nr, dm), dtype=u.dtype)
    dbias_p = np.zeros((nb, nk, dm), dtype=u.dtype)
    dDk_p = np.zeros((nb, nk, dm), dtype=u.dtype)
    dAT = np.zeros((nb, nk, n, dm), dtype=u.dtype)
    for i in prange(nb * nblk):
        b = i // nblk
        q = i % nblk
        d0 = q * blk
        m = min(dm, d0 + blk) - d0
        w_k = np.empty((nr, m), dtype=u.dtype)
        bias_k = np.empty(m, dtype=u.dtype)
        a_k = np.empty((n, m), dtype=u.dtype)
        d_k = np.empty(m, dtype=u.dtype)
        hbuf = np.empty((chunk + 1, n, m), dtype=u.dtype)  # hbuf[s + 1]: state after step s of the chunk
        ebuf = np.empty((chunk, n, m), dtype=u.dtype)  # exp(dt A) of step s
        dtbuf = np.empty((chunk, m), dtype=u.dtype)
        sgbuf = np.empty((chunk, m), dtype=u.dtype)  # softplus' = sigmoid of the pre-activation
        g = np.zeros((n, m), dtype=u.dtype)  # dL/dh carried backwards in sequence order
        x = np.empty(m, dtype=u.dtype)
        zero = np.zeros(1, dtype=u.dtype)[0]
        ddt = np.empty(m, dtype=u.dtype)
        dus = np.empty(m, dtype=u.dtype)
        gdt = np.empty(m, dtype=u.dtype)  # dt * u of the step
        da_k = np.empty((n, m), dtype=u.dtype)
        dw_k = np.empty((nr, m), dtype=u.dtype)
        db_k = np.empty(m, dtype=u.dtype)
        dd_k = np.empty(m, dtype=u.dtype)
        for k in range(nk):
            _params(w, bias, A, Dk, k, d0, m, w_k, bias_k, a_k, d_k)
            g[:, :] = 0
            da_k[:, :] = 0
            dw_k[:, :] = 0
            db_k[:] = 0
            dd_k[:] = 0
            for c in range(nc - 1, -1, -1):
                t0 = c * chunk
                nt = min(length, t0 + chunk) - t0
                hbuf[0] = ckpt[b, k, c, :, d0 : d0 + m]
                for s in range(nt):  # recompute the chunk
                    xdj = xd[b, idx[k, t0 + s], k]
                    uj = u[b, idx[k, t0 + s], d0 : d0 + m]
                    _delta(x, xdj, w_k, bias_k, nr, m)
                    dts = dtbuf[s]
                    sgs = sgbuf[s]
                    for d in range(m):
                        dts[d], sgs[d] = _softplus_sigmoid(x[d])
                    for d in range(m):
                        gdt[d] = dts[d] * uj[d]
                    for e in range(n):
                        be = xdj[nr + e]
                        a_e = a_k[e]
                        ev = ebuf[s, e]
                        h0 = hbuf[s, e]
                        h1 = hbuf[s + 1, e]
                        for d in range(m):
                            ev[d] = _exp(dts[d] * a_e[d])
                            h1[d] = ev[d] * h0[d] + gdt[d] * be
                for s in range(nt - 1, -1, -1):  # walk it backwards
                    j = idx[k, t0 + s]
                    xdj = xd[b, j, k]
                    dxj = dxd_p[q, b, j, k]
                    uj = u[b, j, d0 : d0 + m]
                    gyj = gy[b, j, d0 : d0 + m]
                    duj = du[b, j, d0 : d0 + m]
                    dts = dtbuf[s]
                    for d in range(m):
                        ddt[d] = 0
                        dus[d] = gyj[d] * d_k[d]
                        dd_k[d] += gyj[d] * uj[d]
                        gdt[d] = dts[d] * uj[d]
                    for e in range(n):
                        be = xdj[nr + e]
                        ce = xdj[nr + n + e]
                        a_e = a_k[e]
                        ev = ebuf[s, e]
                        h0 = hbuf[s, e]
                        h1 = hbuf[s + 1, e]
                        ge_ = g[e]
                        da_e = da_k[e]
                        db = zero
                        dc = zero
                        for d in range(m):
                            gv = ge_[d] + gyj[d] * ce  # total dL/dh at this step
                            dc += gyj[d] * h1[d]
                            ga = gv * h0[d] * ev[d]  # dL/d(dt A) through exp
                            ddt[d] += ga * a_e[d] + gv * uj[d] * be
                            da_e[d] += ga * dts[d]
                            db += gv * gdt[d]
                            dus[d] += gv * dts[d] * be
                            ge_[d] = gv * ev[d]
                        dxj[nr + e] = db
                        dxj[nr + n + e] = dc
                    sgs = sgbuf[s]
                    for d in range(m):
                        ddt[d] *= sgs[d]  # now dL/d(pre-softplus)
                        db_k[d] += ddt[d]
                        duj[d] += dus[d]
                    for r in range(nr):
                        xr = xdj[r]
                        wr = w_k[r]
                        dwr = dw_k[r]
                        acc = zero
                        for d in range(m):
                            acc += ddt[d] * wr[d]
                            dwr[d] += ddt[d] * xr
                        dxj[r] = acc
            dAT[b, k, :, d0 : d0 + m] = da_k
            dwT[b, k, :, d0 : d0 + m] = dw_k
            dbias_p[b, k, d0 : d0 + m] = db_k
            dDk_p[b, k, d0 : d0 + m] = dd_k
    dxd = dxd_p[0]
    for q in range(1, nblk):
        dxd += dxd_p[q]
    dw = np.zeros_like(w)
    dA = np.zeros_like(A)
    dbias = np.zeros_like(bias)
    dDk = np.zeros_like(Dk)
    for b in range(nb):
        dbias += dbias_p[b]
        dDk += dDk_p[b]
        for k in range(nk):
            for d in range(dm):
                for r in range(nr):
                    dw[k, d, r] += dwT[b, k, r, d]
                for s in range(n):
                    dA[k, d, s] += dAT[b, k, s, d]
    return du, dxd, dw, dbias, dA, dDk
