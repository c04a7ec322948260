"""The `pscan` backend of `vmddpm.ops.selective_scan`: pure PyTorch, any device, memory-bounded.

It computes the whole S6 op of `selective_scan` (see that module for the definition and shapes)::

    dt  = softplus(delta + delta_bias)     (each part optional)
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = <C_t, h_t>,   out = (y + D u) * silu(z)

as one autograd function with an analytic backward.

Memory. The sequence is cut into chunks of `PSCAN_CHUNK` steps (`PSCAN_CHUNK_ACCEL` off the CPU).
The forward keeps only its inputs (as given, no casts or copies) and the (batch, dim, N) state at
the start of each chunk; the (L, batch, dim, N) states never exist at once. The backward walks the
chunks in reverse: it recomputes the chunk's states from its start state, runs the gradient
recurrence g_t = dL/dh_t + exp(dt_{t+1} A) g_{t+1} backwards through the chunk (the analytic reverse
scan: no autograd graph over L), and hands exp(dt_s A) g_s of the chunk's first step s on to the
chunk before it. So the working set is a few (chunk, batch, dim, N) buffers beside the output and
the input gradients, whatever L is. The price is one recomputation of the states (a second forward
scan inside the backward); on CPU the small working set more than pays it back (cache, no page
faults): see benchmarks/bench_pscan_memory.py.

Within a chunk the linear recurrence runs as a recursive tiled scan (`_scan_dim0`): a few dozen
large tensor ops per chunk instead of one small op per step.

Precision. Everything (softplus, the decays, the scan, the D skip, the z gate, every gradient) is
computed in float32 (float64 when any input is float64, for tests at 1e-10) with autocast disabled,
also in the backward; the output and each input's gradient are rounded once, to that tensor's dtype,
as mamba-ssm's CUDA kernel does. The optional last state stays in the compute dtype, as in mamba-ssm.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.autograd.function import once_differentiable

PSCAN_CHUNK = 128
"""Steps per chunk on CPU (an implementation tile, not a model knob); other devices: PSCAN_CHUNK_ACCEL.

Working memory is ~4 (chunk + 1, batch, dim, N) buffers (allocated once per forward/backward and
reused by every chunk), i.e. ~4 * chunk * N / L of one (batch, dim, L) tensor, beside the input
gradients. Chosen by `benchmarks/bench_pscan_memory.py` (results/benchmarks/pscan_memory.json; b1
d512 L16384 N16, fp32, forward+backward, one thread on a shared 2-core EPYC), chunks of 64 / 128 /
256 / 512 / 1024 / 2048 steps: peak 3.0 / 3.3 / 4.0 / 5.5 / 7.8 / 13.8x one (b, d, L) tensor above the
inputs, CPU time 1.35 / 1.38 / 1.46 / 1.71 / 1.85 / 1.84 s (buffers beyond ~4 MiB outgrow the
caches). 128 is as fast and nearly as small as 64 with half its tensor ops.
"""

PSCAN_CHUNK_ACCEL = 1024
"""Steps per chunk on any device but the CPU (CUDA, MPS, ...): larger, because there every tensor op
is a kernel launch of a few microseconds and a chunk costs ~170-270 of them whatever its length:
forward + backward at L16384 takes ~4,300 ops at 1024, ~23,000 at 128 and 261 for the unchunked scan
before (counted by the benchmark, `ops_per_step`). Its working memory, ~4 * 1024 * N / L of one
(batch, dim, L) tensor, is 4x at L16384 N16 (7.8x peak in the CPU sweep). Not yet timed on a GPU:
measure with `bench_pscan_memory.py --device cuda --chunks ...` before trusting it.
"""


def default_chunk(device: torch.device) -> int:
    """PSCAN_CHUNK on CPU, PSCAN_CHUNK_ACCEL elsewhere (read at call time, so tests can patch them)."""
    return PSCAN_CHUNK if device.type == "cpu" else PSCAN_CHUNK_ACCEL


_TILE = 16
"""Tile of the recursive scan inside a chunk (`_scan_dim0`): ~2 * tile * log_tile(chunk) tensor ops
per scan of a chunk."""


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (fp16/bf16 inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled on `device`'s type (a no-op for types autocast does not know)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- linear scan
def _scan_dim0(
    a: torch.Tensor, x: torch.Tensor, tile: int = _TILE, reverse: bool = False, inplace: bool = False
) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + x_t along dim 0 of (T, M) tensors, h_{-1} = 0, without autograd
    (`reverse`: h_t = a_t * h_{t+1} + x_t, h_T = 0). With `inplace`, x may be overwritten by h.

    Recursive tiled scan: split T into tiles of `tile` steps. Pass 1 runs the recurrence inside all
    tiles at once from a zero state (tile - 1 steps, each over T/tile * M elements), keeping only
    the running state (the tile's last state) and, in one reduction, the product of each tile's
    decays; the true state at each tile's end is the same scan over the T/tile tiles (recursion).
    Pass 2 adds the carried-in state to each tile's first step and runs the recurrence again, in
    place. About 2 * tile * log_tile(T) tensor ops per call and ~6 passes over (T, M) data (a three
    times, x twice, h once), no (T, M) temporaries. Only products of the a_t appear (no division, no
    exp(-cumsum)), so with 0 <= a_t <= 1 every factor is <= 1: numerically stable.
    """
    length, m = x.shape
    nc = -(-length // tile)
    pad = nc * tile - length
    if pad:
        h = torch.cat([x, x.new_zeros(pad, m)])
    else:
        h = x if inplace else x.clone()
    if nc <= 1:
        steps = range(length - 2, -1, -1) if reverse else range(1, length)
        for t in steps:
            h[t].addcmul_(a[t], h[t + 1 if reverse else t - 1])
        return h[:length]
    if pad:
        a = torch.cat([a, a.new_ones(pad, m)])
    a3, h3 = a.view(nc, tile, m), h.view(nc, tile, m)
    first, order, prev = (tile - 1, range(tile - 2, -1, -1), 1) if reverse else (0, range(1, tile), -1)
    run = h3[:, first].clone()  # pass 1: each tile from a zero state, keeping only the running state
    for k in order:
        torch.addcmul(h3[:, k], a3[:, k], run, out=run)
    ends = _scan_dim0(torch.prod(a3, 1), run, tile, reverse, inplace=True)  # true tile-end states
    if reverse:
        h3[:-1, -1].addcmul_(a3[:-1, -1], ends[1:])
    else:
        h3[1:, 0].addcmul_(a3[1:, 0], ends[:-1])
    for k in order:  # pass 2: the recurrence again, from the true states
        h3[:, k].addcmul_(a3[:, k], h3[:, k + prev])
    return h[:length]


# ------------------------------------------------------------------------------------ layout
# Inside a chunk, time leads and the state is laid out (T, batch, G, N, dim/G): channel d = k * dim/G + j
# sits at [k, :, j]. G = lcm(groups of B, groups of C) (a constant (dim, N) B or C counts as dim
# groups), so that every B/C group is a whole number of layout groups. With N before the channels,
# the contractions over N (y = <C, h>, dL/d(dt u) = <B, g>) are batched (1, N) @ (N, dim/G) products
# and the sums over N run along a middle axis: both vectorise over channels, unlike sums over a
# trailing axis of length N.
def _groups(m: torch.Tensor, dim: int) -> int:
    return dim if m.dim() == 2 else 1 if m.dim() == 3 else m.shape[1]


class _Plan:
    """What every chunk shares: shapes, the layout groups, A in the layout, the compute dtype."""

    def __init__(self, inp: tuple, softplus: bool, chunk: int):
        u, _, A, B, C, D, _, delta_bias = inp
        self.cdt = compute_dtype(*inp)
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        self.gb, self.gc = _groups(B, self.dim), _groups(C, self.dim)
        self.G = math.lcm(self.gb, self.gc)
        self.dg = self.dim // self.G
        self.A = self.to_layout(A.to(self.cdt))  # (G, N, dim/G)
        self.D = None if D is None else D.to(self.cdt)[:, None]
        self.bias = None if delta_bias is None else delta_bias.to(self.cdt)[:, None]
        self.softplus = softplus
        self.rows = min(chunk, self.length) + 1
        self.device = u.device
        self._ws: dict[str, torch.Tensor] = {}

    def buf(self, name: str, rows: int) -> torch.Tensor:
        """A (rows, batch, G, N, dim/G) workspace, allocated once per forward/backward and reused by
        every chunk (fresh chunk-sized allocations would page-fault, or churn a caching allocator)."""
        if name not in self._ws:
            shape = (self.rows, self.batch, self.G, self.n, self.dg)
            self._ws[name] = torch.empty(shape, dtype=self.cdt, device=self.device)
        return self._ws[name][:rows]

    def to_layout(self, t: torch.Tensor) -> torch.Tensor:
        """(..., dim, N) -> (..., G, N, dim/G), contiguous."""
        return t.unflatten(-2, (self.G, self.dg)).transpose(-1, -2).contiguous()

    def from_layout(self, t: torch.Tensor) -> torch.Tensor:
        """(..., G, N, dim/G) -> (..., dim, N)."""
        return t.transpose(-1, -2).flatten(-3, -2)

    def bc(self, m: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """B or C for steps [s, e) as a contiguous (T, batch, G, N) in the compute dtype."""
        if m.dim() == 2:  # constant: G = dim
            return m.to(self.cdt).expand(e - s, self.batch, *m.shape).contiguous()
        mt = m[:, :, s:e].unsqueeze(1) if m.dim() == 3 else m[..., s:e]
        mt = mt.to(self.cdt).permute(3, 0, 1, 2)  # (T, batch, groups, N)
        return mt.repeat_interleave(self.G // mt.shape[2], dim=2)

    @staticmethod
    def store_bc_grad(buf: torch.Tensor, grad: torch.Tensor, s: int, e: int) -> None:
        """Add the (T, batch, G, N) gradient of steps [s, e) to B's or C's gradient buffer (B's shape;
        a constant (dim, N) B/C sums over T and batch, in the compute dtype)."""
        if buf.dim() == 2:
            buf += grad.sum((0, 1))
            return
        groups = 1 if buf.dim() == 3 else buf.shape[1]
        grad = grad.unflatten(2, (groups, grad.shape[2] // groups)).sum(3)  # (T, batch, groups, N)
        if buf.dim() == 3:
            buf[:, :, s:e] = grad[:, :, 0].permute(1, 2, 0)
        else:
            buf[..., s:e] = grad.permute(1, 2, 3, 0)


class _Chunk:
    """One chunk [s, e) recomputed from its start state h0 (batch, G, N, dim/G): dt before and after
    softplus, u, B, C in the compute dtype, the decays a and the states h (T, batch, G, N, dim/G)."""

    def __init__(self, p: _Plan, inp: tuple, s: int, e: int, h0: torch.Tensor):
        u, delta, _, B, C, _, _, _ = inp
        T, batch, G, dg = e - s, p.batch, p.G, p.dg
        self.p, self.s, self.e, self.h0 = p, s, e, h0
        dtr = delta[..., s:e].to(p.cdt)
        if p.bias is not None:
            dtr = dtr + p.bias
        self.dtr = dtr  # (batch, dim, T), before softplus
        dt = torch.nn.functional.softplus(dtr) if p.softplus else dtr
        self.u = u[..., s:e].to(p.cdt)  # (batch, dim, T)
        self.dt_t = dt.permute(2, 0, 1).contiguous()  # (T, batch, dim)
        self.u_t = self.u.permute(2, 0, 1).contiguous()
        self.dtu_t = self.dt_t * self.u_t
        self.Bt, self.Ct = p.bc(B, s, e), p.bc(C, s, e)  # (T, batch, G, N)
        # decays a_t = exp(dt_t A) in rows 0..T-1 of a (T+1)-row buffer: rows 1..T are then the
        # decays shifted by one step, which the backward's reverse scan needs (row T set to 0 there).
        self.abuf = p.buf("a", T + 1)
        a = self.abuf[:T]
        torch.mul(self.dt_t.view(T, batch, G, 1, dg), p.A, out=a).exp_()
        x = torch.mul(self.dtu_t.view(T, batch, G, 1, dg), self.Bt.unsqueeze(-1), out=p.buf("x", T))
        x[0].addcmul_(a[0], h0)
        m = h0.numel()
        self.h = _scan_dim0(a.view(T, m), x.view(T, m), inplace=True).view(x.shape)

    def _flat(self, t: torch.Tensor, k: int) -> torch.Tensor:
        return t.reshape(-1, *t.shape[-k:])

    def y(self) -> torch.Tensor:
        """<C_t, h_t> as (batch, dim, T)."""
        T, p = self.e - self.s, self.p
        y = torch.bmm(self._flat(self.Ct, 1).unsqueeze(1), self._flat(self.h, 2))  # (T b G, 1, dg)
        return y.view(T, p.batch, p.dim).permute(1, 2, 0)

    def out_pre_gate(self) -> torch.Tensor:
        """y + D u as (batch, dim, T)."""
        y = self.y()
        return y if self.p.D is None else y + self.u * self.p.D

    def reduce_n(self, v_t: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
        """sum over the channels of each layout group of v[t, b, d] * t5[t, b, g, n, j] -> (T, b, G, N)."""
        T, p = self.e - self.s, self.p
        r = torch.bmm(v_t.reshape(-1, 1, p.dg), self._flat(t5, 2).transpose(1, 2))  # (T b G, 1, N)
        return r.view(T, p.batch, p.G, p.n)


class _PScan(torch.autograd.Function):
    """The whole S6 op, chunked over L, with the analytic chunk-by-chunk backward of the module doc."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int):
        inp = (u, delta, A, B, C, D, z, delta_bias)
        p = _Plan(inp, softplus, chunk)
        nc = -(-p.length // chunk)
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        starts = u.new_empty(nc, p.batch, p.G, p.n, p.dg, dtype=p.cdt)  # the state before each chunk
        h0 = u.new_zeros(p.batch, p.G, p.n, p.dg, dtype=p.cdt)
        for k in range(nc):
            s, e = k * chunk, min(p.length, (k + 1) * chunk)
            starts[k] = h0
            c = _Chunk(p, inp, s, e, h0)
            o = c.out_pre_gate()
            if z is not None:
                o = o * torch.nn.functional.silu(z[..., s:e].to(p.cdt))
            out[..., s:e] = o
            h0 = c.h[-1].clone()
            del c, o
        ctx.save_for_backward(*inp, starts)
        ctx.softplus, ctx.chunk = softplus, chunk
        ctx.set_materialize_grads(False)
        return out, p.from_layout(h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        *inp, starts = ctx.saved_tensors
        with no_autocast(starts.device):
            grads = _backward(tuple(inp), starts, dout, dlast, ctx.softplus, ctx.chunk, ctx.needs_input_grad)
        return (*grads, None, None)


def _zeros_grad(t: torch.Tensor | None, need: bool, cdt: torch.dtype) -> torch.Tensor | None:
    """The gradient buffer of input t: its shape and dtype for (batch, ..., L) tensors (filled chunk
    by chunk, rounded once), the compute dtype for the small accumulated ones (rounded at the end)."""
    if t is None or not need:
        return None
    if t.dim() >= 3:
        return torch.zeros_like(t, memory_format=torch.contiguous_format)
    return torch.zeros(t.shape, dtype=cdt, device=t.device)


def _backward(inp, starts, dout, dlast, softplus, chunk, need):
    _, _, A, B, C, D, z, delta_bias = inp
    p = _Plan(inp, softplus, chunk)
    cdt, batch, G, n, dg = p.cdt, p.batch, p.G, p.n, p.dg
    du, ddelta, dA, dB, dC, dD, dz, dbias = (_zeros_grad(t, w, cdt) for t, w in zip(inp, need, strict=False))
    # dL/dh at the last step of the current chunk from the steps after it (at L - 1: dlast)
    carry = None if dlast is None else p.to_layout(dlast.to(cdt))
    for k in range(starts.shape[0] - 1, -1, -1):
        s, e = k * chunk, min(p.length, (k + 1) * chunk)
        T = e - s
        c = _Chunk(p, inp, s, e, starts[k])
        h = c.h
        # out = (y + D u) * silu(z): gradients of z, D and of u through D; dL/dy.
        du_direct = None
        if dout is not None:
            do = dout[..., s:e].to(cdt)
            if z is not None:
                zc = z[..., s:e].to(cdt)
                sz = torch.sigmoid(zc)
                if dz is not None:
                    dz[..., s:e] = do * c.out_pre_gate() * sz * (1 + zc * (1 - sz))
                do = do * (zc * sz)
            if dD is not None:
                dD += (do * c.u).sum((0, 2))
            if p.D is not None:
                du_direct = do * p.D
            dy_t = do.permute(2, 0, 1).contiguous()  # (T, batch, dim)
            if dC is not None:
                p.store_bc_grad(dC, c.reduce_n(dy_t, h), s, e)
            g = torch.mul(dy_t.view(T, batch, G, 1, dg), c.Ct.unsqueeze(-1), out=p.buf("g", T))  # via y_t
        else:
            g = p.buf("g", T).zero_()
        if carry is not None:
            g[-1] += carry
        # g_t = dL/dh_t + a_{t+1} g_{t+1}: the reverse scan, with the decays shifted by one step.
        a0 = c.abuf[0].clone()
        c.abuf[T].zero_()
        a_next = c.abuf[1:]
        m = c.h0.numel()
        g = _scan_dim0(a_next.view(T, m), g.view(T, m), reverse=True, inplace=True).view(h.shape)
        carry = a0 * g[0]  # a_s g_s: what the state before this chunk receives
        # q_t = g_t h_{t-1} a_t = dL/d(dt_t A), stored rolled by one step (q[t-1] = q_t, q[T-1] = q_0)
        # in a_next's buffer (a_next[t-1] = a_t).
        q = a_next
        q[:-1].mul_(h[:-1]).mul_(g[1:])
        q[-1] = a0.mul_(c.h0).mul_(g[0])
        if dA is not None:
            dt_roll = torch.roll(c.dt_t, -1, 0).view(T, batch, G, 1, dg)
            dA += p.from_layout(torch.mul(q, dt_roll, out=p.buf("t", T)).sum((0, 1)))
        ddt_t = torch.roll(q.mul_(p.A).sum(3).view(T, batch, p.dim), 1, 0)  # through the decays
        del q, a_next
        c.abuf = None
        # x_t = dt_t u_t B_t: gradients of B, and of dt and u through dt * u.
        if dB is not None:
            p.store_bc_grad(dB, c.reduce_n(c.dtu_t, g), s, e)
        ddtu = torch.bmm(c.Bt.reshape(-1, 1, n), g.view(-1, n, dg)).view(T, batch, p.dim)
        del g
        ddt_t += ddtu * c.u_t
        if du is not None:
            du_c = (ddtu * c.dt_t).permute(1, 2, 0)
            du[..., s:e] = du_c if du_direct is None else du_c + du_direct
        ddt = ddt_t.permute(1, 2, 0)  # (batch, dim, T)
        if softplus:
            ddt = ddt * torch.sigmoid(c.dtr)
        if ddelta is not None:
            ddelta[..., s:e] = ddt
        if dbias is not None:
            dbias += ddt.sum((0, 2))
        del c, h

    def cast(g, t):
        return None if g is None else g.to(t.dtype)

    return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, delta_bias))


def selective_scan_pscan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The S6 op (inputs already validated by `selective_scan`): `(out, last_state)`, out in u's dtype,
    last_state (batch, dim, N) in the compute dtype. `chunk`: steps per chunk, by default
    `default_chunk(u.device)`."""
    chunk = default_chunk(u.device) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"selective_scan_pscan: chunk must be >= 1, got {chunk}")
    with no_autocast(u.device):
        return _PScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk)
