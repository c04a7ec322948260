"""Fused CPU kernels (numba) for the core S6 scan, forward and backward.

Why a kernel: the pure-PyTorch scans materialise (L, batch, dim, N) tensors several times per step;
this kernel keeps only the (N,) state of one (batch, channel) pair in registers/cache and makes one
pass over the sequence, parallel over batch x channel. The backward does not invert the recurrence
(h_{t-1} = (h_t - dt B u) / exp(dt A) blows up when exp(dt A) is small); it stores the state at the
start of every chunk of `chunk` steps in the forward and recomputes the chunk's states from there.

Core problem solved here (the cheap parts around it are plain torch in `selective_scan.py`)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0,   y_t = <C_t, h_t>

Layouts (contiguous numpy arrays of one float dtype): u, dt, y (batch, dim, L); A (dim, N);
Bt, Ct (batch, groups, L, N) (time before state so that the inner loop over N is contiguous);
channel d uses group d // (dim // groups). This module imports numba at import time: import it
only after checking that numba is importable.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False)
def scan_fwd(u, dt, A, Bt, Ct, chunk):  # pragma: no cover - compiled
    """Returns y (batch, dim, L), the last state (batch, dim, N) and the chunk-start states
    (batch, dim, n_chunks, N) that the backward recomputes from."""
    nb, nd, length = u.shape
    n = A.shape[1]
    per_group = nd // Bt.shape[1]
    nc = (length + chunk - 1) // chunk
    y = np.zeros((nb, nd, length), dtype=u.dtype)
    last = np.zeros((nb, nd, n), dtype=u.dtype)
    ckpt = np.zeros((nb, nd, nc, n), dtype=u.dtype)
    for i in prange(nb * nd):
        b = i // nd
        d = i % nd
        g = d // per_group
        h = np.zeros(n, dtype=u.dtype)
        for t in range(length):
            if t % chunk == 0:
                ckpt[b, d, t // chunk, :] = h
            dtt = dt[b, d, t]
            dbu = dtt * u[b, d, t]
            acc = 0.0
            for k in range(n):
                hk = math.exp(dtt * A[d, k]) * h[k] + dbu * Bt[b, g, t, k]
                h[k] = hk
                acc += Ct[b, g, t, k] * hk
            y[b, d, t] = acc
        last[b, d, :] = h
    return y, last, ckpt


@njit(parallel=True, cache=True, fastmath=False)
def scan_bwd(u, dt, A, Bt, Ct, ckpt, dy, dlast, chunk):  # pragma: no cover - compiled
    """Gradients (du, ddt, dA per batch (batch, dim, N), dBt, dCt) from dy (batch, dim, L) and
    dlast (batch, dim, N). Parallel over batch x group (not channel) so that the channels sharing
    one group's B/C add into dBt/dCt without races."""
    nb, nd, length = u.shape
    n = A.shape[1]
    ng = Bt.shape[1]
    per_group = nd // ng
    nc = ckpt.shape[2]
    du = np.zeros_like(u)
    ddt = np.zeros_like(dt)
    dA = np.zeros((nb, nd, n), dtype=u.dtype)
    dB = np.zeros_like(Bt)
    dC = np.zeros_like(Ct)
    for i in prange(nb * ng):
        b = i // ng
        g = i % ng
        hbuf = np.empty((chunk + 1, n), dtype=u.dtype)  # hbuf[k + 1]: state after step k of the chunk
        ebuf = np.empty((chunk, n), dtype=u.dtype)  # exp(dt * A) of step k
        gs = np.empty(n, dtype=u.dtype)  # dL/dh carried backwards in time
        for d in range(g * per_group, (g + 1) * per_group):
            gs[:] = dlast[b, d, :]
            for c in range(nc - 1, -1, -1):
                t0 = c * chunk
                t1 = min(length, t0 + chunk)
                hbuf[0, :] = ckpt[b, d, c, :]
                for k in range(t1 - t0):
                    t = t0 + k
                    dtt = dt[b, d, t]
                    dbu = dtt * u[b, d, t]
                    for j in range(n):
                        e = math.exp(dtt * A[d, j])
                        ebuf[k, j] = e
                        hbuf[k + 1, j] = e * hbuf[k, j] + dbu * Bt[b, g, t, j]
                for k in range(t1 - t0 - 1, -1, -1):
                    t = t0 + k
                    dtt = dt[b, d, t]
                    ut = u[b, d, t]
                    dyt = dy[b, d, t]
                    acc_dt = 0.0
                    acc_du = 0.0
                    for j in range(n):
                        dC[b, g, t, j] += dyt * hbuf[k + 1, j]
                        gj = gs[j] + dyt * Ct[b, g, t, j]  # total dL/dh_t
                        e = ebuf[k, j]
                        bj = Bt[b, g, t, j]
                        ge = gj * hbuf[k, j] * e  # dL/d(dt * A) through exp
                        acc_dt += ge * A[d, j] + gj * ut * bj
                        dA[b, d, j] += ge * dtt
                        dB[b, g, t, j] += gj * dtt * ut
                        acc_du += gj * dtt * bj
                        gs[j] = gj * e  # dL/dh_{t-1}
                    ddt[b, d, t] = acc_dt
                    du[b, d, t] = acc_du
    return du, ddt, dA, dB, dC
