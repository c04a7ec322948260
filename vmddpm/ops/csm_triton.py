"""Triton kernels for the Cross-Scan Module's S6 core on CUDA (the op of `vmddpm.ops.cross_scan`).

Both paths read the map's tokens in place through the SR index table `idx` (K, L) (token
`idx[k, p]` is position p of direction k's sequence); neither materialises flips, transposes,
gathers or casts with torch ops.

1. Around mamba-ssm (`csm_scan_mamba`): VMamba's `csm_triton.py` generalised from its four fixed
   directions to any per-direction permutation. `cross_scan_tokens` writes u (B, L, d) straight into
   mamba's layout (B, K*d, L) in one pass; `gather_x_dbl` writes the per-direction delta (B, K*d, L)
   (the dt projection done in-kernel in fp32: delta = dt_weight[k] @ x_dbl[b, idx[k], k, :R]) and
   B, C (B, K, N, L) from x_dbl (B, L, K, R+2N); `cross_merge_tokens` folds mamba's (B, K*d, L)
   output back to (B, L, d), summing the K directions in fp32. Each is an autograd Function whose
   backward is the adjoint kernel (scan <-> merge, gather <-> scatter), so no dtype casts and no
   zero-filled buffers appear outside the kernels: bf16 in (autocast) -> bf16 to mamba.

2. A selective scan of our own (`csm_scan_triton`), for a GPU without mamba-ssm: one program per
   (batch, block of BD channels) loops over the K directions, so the merge needs no atomics: the
   program accumulates each token's output over the directions in a fixed order (direction 0
   stores, the next ones read-add-write, the last one writes y in u's dtype; an fp32 workspace
   holds the partial sums when y is half precision; a CTA barrier separates the directions, whose
   token orders differ). Along L it walks tiles of T positions: the tile's dt projection (a small
   fp32 dot), softplus, exp(dt A), dt B u are formed in registers, `tl.associative_scan` solves
   the linear recurrence inside the tile and the fp32 state (BD, N) carries it to the next tile.
   The forward stores the state every `chunk` positions (the checkpoints: (B, K, L/chunk, d, N)
   fp32 = N/chunk of a (B, K, d, L) fp32 tensor, a quarter at the defaults N=16, chunk=64).
   The backward walks the chunks in reverse: it recomputes the tile-start states of one chunk from
   its checkpoint (into a per-program scratch of chunk/T states), then for each tile in reverse
   recomputes the states, runs the adjoint recurrence g_p = C_p dy_p + exp(dt_{p+1} A) g_{p+1} as a
   reverse scan (the tile's next-position decays come from a shifted load, so no register shift is
   needed), and forms every gradient in the same pass. a_p h_{p-1} is h_p - dt_p B_p u_p, so the
   previous state is never needed either.

Determinism: every kernel here is deterministic (no atomics). Reductions over channels (dB, dC and
the dt_low part of dx_dbl) go to per-channel-block partial buffers (one per block of BD channels,
(d/BD, B, L, K, R+2N) fp32, transient) summed in a fixed order by a small kernel; reductions over
batch and L (dA, dD, ddt_bias, ddt_weight) go to per-(batch, channel-block) or per-split partials
summed by torch. mamba-ssm's own backward (path 1) accumulates dB, dC, dA, dD and ddelta_bias with
atomicAdd: that part is not deterministic.

Precision: the state and every accumulation are fp32 (fp64 when an input is fp64, so tests can
compare with the reference at 1e-10); inputs are read in their dtype, outputs written in the dtype
of the tensor they stand for (y like u, dx_dbl like x_dbl, parameter grads like the parameters).
softplus uses torch's threshold (x > 20 -> x) and a stable log1p. On GPU, fp32 dots use
`input_precision="ieee"` (no TF32).

Memory beyond inputs and outputs: forward, the checkpoints (kept for the backward) and, for half
precision y, a transient fp32 (B, L, d) workspace; backward, the same workspace for du, the dB/dC
partials above (d/16 x the size of x_dbl in fp32, transient) and small per-batch parameter partials.

Testing without a GPU: set `TRITON_INTERPRET=1` before this module is imported (triton reads it
when the kernels are decorated); the kernels then run on CPU tensors (`tests/test_csm_triton.py`
does this in a subprocess). The interpreter truncates fp32 -> bf16 where compiled code rounds to
nearest even (one bf16 ulp). Shapes: tl.dot needs T, BD >= 16, so tiles are at least 16 x 16 (R
is padded to 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vmddpm.ops.csm_shapes import validate_csm_inputs

_INTERPRET = bool(triton.knobs.runtime.interpret)

TILE = 16
"""Positions per register tile of the fused scan (a kernel tile size, not a model knob)."""
CHUNK = 64
"""Positions between the state checkpoints of the fused scan (multiple of TILE)."""
BD_BWD = 16
"""Channels per program in the fused backward: also the number of dB/dC partial buffers (d / BD_BWD)."""


def _tuned(configs, key):
    """triton.autotune on a GPU; the plain kernel under the interpreter (which launches the
    meta-parameters the caller passes)."""

    def wrap(fn):
        return fn if _INTERPRET else triton.autotune(configs=configs, key=key)(fn)

    return wrap


def _meta(**defaults):
    """Meta-parameters to pass explicitly: only under the interpreter (autotune picks them on GPU)."""
    return defaults if _INTERPRET else {}


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def _inverse(idx: torch.Tensor) -> torch.Tensor:
    """inv[k, idx[k, p]] = p (idx: each row a permutation)."""
    inv = torch.empty_like(idx)
    pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    return inv.scatter_(1, idx, pos)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ======================================================================== 1. cross-scan / merge
_SCAN_CONFIGS = [
    triton.Config({"BL": 64, "BD": 32}, num_warps=4),
    triton.Config({"BL": 64, "BD": 32}, num_warps=8),
    triton.Config({"BL": 128, "BD": 32}, num_warps=8),
    triton.Config({"BL": 64, "BD": 64}, num_warps=8),
]


@_tuned(_SCAN_CONFIGS, key=["L", "DIM", "K"])
@triton.jit
def _cross_scan_kernel(
    u_ptr, idx_ptr, xs_ptr, L, DIM, su_b, su_l, su_d,
    K: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """xs[b, k*d + c, p] = u[b, idx[k, p], c]: gathered token rows (contiguous along c) in, stores
    contiguous along p out (the compiler transposes the tile through shared memory)."""
    pid_l, pid_d, bk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bk // K).to(tl.int64)
    k = bk % K
    p = pid_l * BL + tl.arange(0, BL)
    mp = p < L
    c = pid_d * BD + tl.arange(0, BD)
    mc = c < DIM
    j = tl.load(idx_ptr + k * L + p, mask=mp, other=0)
    m = mc[:, None] & mp[None, :]
    v = tl.load(u_ptr + b * su_b + j[None, :] * su_l + c[:, None] * su_d, mask=m)
    out = xs_ptr + ((b * K + k) * DIM + c[:, None]) * L + p[None, :]
    tl.store(out, v, mask=m)


@_tuned(_SCAN_CONFIGS, key=["L", "DIM", "K"])
@triton.jit
def _cross_merge_kernel(
    y_ptr, inv_ptr, out_ptr, L, DIM, sy_b, sy_c, sy_l,
    K: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """out[b, j, c] = sum_k y[b, k*d + c, inv[k, j]], summed in ACC, stored in out's dtype
    (contiguous along c); the K reads are gathers along L (coalesced for the identity and reversed
    directions, L2-served for the transposed ones since neighbouring programs share sectors)."""
    pid_l, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    jj = pid_l * BL + tl.arange(0, BL)
    mj = jj < L
    c = pid_d * BD + tl.arange(0, BD)
    mc = c < DIM
    m = mj[:, None] & mc[None, :]
    acc = tl.zeros((BL, BD), dtype=ACC)
    for k in tl.static_range(K):
        q = tl.load(inv_ptr + k * L + jj, mask=mj, other=0)
        ptr = y_ptr + b * sy_b + (k * DIM + c[None, :]) * sy_c + q[:, None] * sy_l
        acc += tl.load(ptr, mask=m, other=0.0).to(ACC)
    tl.store(out_ptr + (b * L + jj[:, None]) * DIM + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


def _scan_tokens(u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    batch, length, dim = u.shape
    k = idx.shape[0]
    xs = torch.empty(batch, k * dim, length, dtype=u.dtype, device=u.device)
    if xs.numel():

        def grid(meta):
            return (triton.cdiv(length, meta["BL"]), triton.cdiv(dim, meta["BD"]), batch * k)

        _cross_scan_kernel[grid](
            u, idx, xs, length, dim, *u.stride(), K=k, **_meta(BL=64, BD=32)
        )  # fmt: skip
    return xs


def _merge_tokens(y: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    batch, kd, length = y.shape
    k = inv.shape[0]
    dim = kd // k
    out = torch.empty(batch, length, dim, dtype=y.dtype, device=y.device)
    if out.numel():

        def grid(meta):
            return (triton.cdiv(length, meta["BL"]), triton.cdiv(dim, meta["BD"]), batch)

        _cross_merge_kernel[grid](
            y, inv, out, length, dim, *y.stride(), K=k, ACC=_TL[_acc_dtype(y)], **_meta(BL=64, BD=32)
        )  # fmt: skip
    return out


class _CrossScanTokens(torch.autograd.Function):
    """u (B, L, d) -> (B, K*d, L); the adjoint of a gather by a permutation is the gather by its
    inverse, so the backward is the merge kernel."""

    @staticmethod
    def forward(ctx, u, idx, inv):  # type: ignore[override]
        ctx.save_for_backward(idx, inv)
        return _scan_tokens(u, idx)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        _, inv = ctx.saved_tensors
        return _merge_tokens(grad, inv), None, None


class _CrossMergeTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, idx, inv):  # type: ignore[override]
        ctx.save_for_backward(idx, inv)
        return _merge_tokens(y, inv)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        idx, _ = ctx.saved_tensors
        return _scan_tokens(grad, idx), None, None


def _tables(idx: torch.Tensor, inv: torch.Tensor | None, device: torch.device):
    idx = idx.to(device=device, dtype=torch.int64).contiguous()
    inv = _inverse(idx) if inv is None else inv.to(device=device, dtype=torch.int64).contiguous()
    return idx, inv


def cross_scan_tokens(u: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, L, d) channel-last tokens -> xs (B, K*d, L) contiguous, in u's dtype, one pass:
    xs[b, k*d + c, p] = u[b, idx[k, p], c]. `inv` (K, L), the inverse table, is computed when not
    given (the backward, a merge, needs it). Differentiable (backward = `cross_merge_tokens`)."""
    idx, inv = _tables(idx, inv, u.device)
    return _CrossScanTokens.apply(u, idx, inv)


def cross_merge_tokens(y: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, K*d, L) in each direction's order -> (B, L, d): out[b, j, c] = sum_k y[b, k*d + c,
    inv[k, j]], summed in fp32 (fp64 for fp64 y), written in y's dtype. Differentiable (backward =
    `cross_scan_tokens`)."""
    idx, inv = _tables(idx, inv, y.device)
    return _CrossMergeTokens.apply(y, idx, inv)


# ============================================================================ 1b. x_dbl gathers
_GATHER_CONFIGS = [
    triton.Config({"BL": 64, "BD": 32}, num_warps=4, num_stages=2),
    triton.Config({"BL": 64, "BD": 32}, num_warps=8, num_stages=2),
    triton.Config({"BL": 128, "BD": 32}, num_warps=8, num_stages=2),
    triton.Config({"BL": 64, "BD": 64}, num_warps=8, num_stages=2),
]


@_tuned(_GATHER_CONFIGS, key=["L", "DIM", "K", "R", "N"])
@triton.jit
def _gather_xdbl_kernel(
    x_ptr, w_ptr, idx_ptr, dl_ptr, bo_ptr, co_ptr, L, DIM, sx_b, sx_l, sx_k, sx_e,
    K: tl.constexpr, R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One program per (block of BL positions, batch x direction): B, C rows gathered through idx
    and stored transposed (B, K, N, L); delta[b, k*d + c, p] = sum_r W[k, c, r] x[b, j_p, k, r] for
    every channel block (the (RP, BL) dt_low tile is loaded once, the weights stream from L2)."""
    pid_l, bk = tl.program_id(0), tl.program_id(1)
    b = (bk // K).to(tl.int64)
    k = bk % K
    p = pid_l * BL + tl.arange(0, BL)
    mp = p < L
    j = tl.load(idx_ptr + k * L + p, mask=mp, other=0)
    row = x_ptr + b * sx_b + j * sx_l + k * sx_k  # (BL,)
    out_t = dl_ptr.dtype.element_ty
    nn = tl.arange(0, NP)
    mbn = (nn < N)[:, None] & mp[None, :]
    bc_off = ((b * K + k) * N + nn[:, None]) * L + p[None, :]
    bv = tl.load(row[None, :] + (R + nn[:, None]) * sx_e, mask=mbn, other=0.0)
    tl.store(bo_ptr + bc_off, bv.to(out_t), mask=mbn)
    cv = tl.load(row[None, :] + (R + N + nn[:, None]) * sx_e, mask=mbn, other=0.0)
    tl.store(co_ptr + bc_off, cv.to(out_t), mask=mbn)
    rr = tl.arange(0, RP)
    mr = rr < R
    xr = tl.load(row[None, :] + rr[:, None] * sx_e, mask=mr[:, None] & mp[None, :], other=0.0).to(ACC)
    for cb in tl.range(0, tl.cdiv(DIM, BD)):
        c = cb * BD + tl.arange(0, BD)
        mc = c < DIM
        w = tl.load(
            w_ptr + (k * DIM + c[:, None]) * R + rr[None, :], mask=mc[:, None] & mr[None, :], other=0.0
        )
        dl = tl.dot(w.to(ACC), xr, input_precision="ieee", out_dtype=ACC)  # (BD, BL)
        out = dl_ptr + ((b * K + k) * DIM + c[:, None]) * L + p[None, :]
        tl.store(out, dl.to(out_t), mask=mc[:, None] & mp[None, :])


@_tuned(_GATHER_CONFIGS, key=["L", "DIM", "K", "R", "N"])
@triton.jit
def _gather_xdbl_bwd_kernel(
    gd_ptr, gb_ptr, gc_ptr, w_ptr, idx_ptr, dx_ptr, L, DIM,
    sgd_b, sgd_c, sgd_l, sgb_b, sgb_k, sgb_n, sgb_l, sgc_b, sgc_k, sgc_n, sgc_l,
    K: tl.constexpr, R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The adjoint of `_gather_xdbl_kernel`: dx[b, j, k, :] is written once per (b, j, k) (idx[k] is a
    permutation and direction k owns slot k of x_dbl), so plain stores, no zero-fill, no atomics:
    dB, dC transposed back, d(dt_low) = W[k]^T ddelta summed over the channel blocks in registers."""
    pid_l, bk = tl.program_id(0), tl.program_id(1)
    b = (bk // K).to(tl.int64)
    k = bk % K
    E: tl.constexpr = R + 2 * N
    p = pid_l * BL + tl.arange(0, BL)
    mp = p < L
    j = tl.load(idx_ptr + k * L + p, mask=mp, other=0)
    row = dx_ptr + ((b * L + j) * K + k) * E  # (BL,)
    out_t = dx_ptr.dtype.element_ty
    nn = tl.arange(0, NP)
    mbn = (nn < N)[:, None] & mp[None, :]
    gb = tl.load(gb_ptr + b * sgb_b + k * sgb_k + nn[:, None] * sgb_n + p[None, :] * sgb_l, mask=mbn)
    tl.store(row[None, :] + R + nn[:, None], gb.to(out_t), mask=mbn)
    gc = tl.load(gc_ptr + b * sgc_b + k * sgc_k + nn[:, None] * sgc_n + p[None, :] * sgc_l, mask=mbn)
    tl.store(row[None, :] + R + N + nn[:, None], gc.to(out_t), mask=mbn)
    rr = tl.arange(0, RP)
    mr = rr < R
    acc = tl.zeros((RP, BL), dtype=ACC)
    for cb in tl.range(0, tl.cdiv(DIM, BD)):
        c = cb * BD + tl.arange(0, BD)
        mc = c < DIM
        w = tl.load(
            w_ptr + (k * DIM + c[:, None]) * R + rr[None, :], mask=mc[:, None] & mr[None, :], other=0.0
        )
        gd_off = b * sgd_b + (k * DIM + c[:, None]) * sgd_c + p[None, :] * sgd_l
        gd = tl.load(gd_ptr + gd_off, mask=mc[:, None] & mp[None, :], other=0.0)
        acc += tl.dot(tl.trans(w.to(ACC)), gd.to(ACC), input_precision="ieee", out_dtype=ACC)
    tl.store(row[None, :] + rr[:, None], acc.to(out_t), mask=mr[:, None] & mp[None, :])


_DW_CONFIGS = [
    triton.Config({"BL": 64, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BL": 128, "BD": 32}, num_warps=4, num_stages=3),
    triton.Config({"BL": 64, "BD": 64}, num_warps=8, num_stages=3),
]


@_tuned(_DW_CONFIGS, key=["L", "DIM", "NB", "K", "R"])
@triton.jit
def _dt_weight_grad_kernel(
    gd_ptr, x_ptr, idx_ptr, part_ptr, L, DIM, NB, sgd_b, sgd_c, sgd_l, sx_b, sx_l, sx_k, sx_e,
    K: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """ddt_weight[k, c, r] = sum_{b, p} ddelta[b, k*d + c, p] x[b, idx[k, p], k, r]: program (channel
    block, k, split s) sums the (b, position block) items s, s + SPLIT, ... into registers and stores
    one partial (SPLIT, K, d, R); torch sums the SPLIT partials (deterministic)."""
    pid_c, k, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nsplit = tl.num_programs(2)
    c = pid_c * BD + tl.arange(0, BD)
    mc = c < DIM
    rr = tl.arange(0, RP)
    mr = rr < R
    nl = tl.cdiv(L, BL)
    acc = tl.zeros((BD, RP), dtype=ACC)
    for it in tl.range(s, NB * nl, nsplit):
        b = (it // nl).to(tl.int64)
        p = (it % nl) * BL + tl.arange(0, BL)
        mp = p < L
        j = tl.load(idx_ptr + k * L + p, mask=mp, other=0)
        gd = tl.load(
            gd_ptr + b * sgd_b + (k * DIM + c[:, None]) * sgd_c + p[None, :] * sgd_l,
            mask=mc[:, None] & mp[None, :], other=0.0,
        )  # fmt: skip
        row = x_ptr + b * sx_b + j * sx_l + k * sx_k
        xr = tl.load(row[:, None] + rr[None, :] * sx_e, mask=mp[:, None] & mr[None, :], other=0.0)
        acc += tl.dot(gd.to(ACC), xr.to(ACC), input_precision="ieee", out_dtype=ACC)
    out = part_ptr + ((s * K + k) * DIM + c[:, None]) * R + rr[None, :]
    tl.store(out, acc, mask=mc[:, None] & mr[None, :])


def _gather_x_dbl_fwd(x_dbl, dt_weight, idx, out_dtype):
    batch, length, k, e = x_dbl.shape
    dim, r = dt_weight.shape[1], dt_weight.shape[2]
    n = (e - r) // 2
    dev = x_dbl.device
    delta = torch.empty(batch, k * dim, length, dtype=out_dtype, device=dev)
    bs = torch.empty(batch, k, n, length, dtype=out_dtype, device=dev)
    cs = torch.empty(batch, k, n, length, dtype=out_dtype, device=dev)
    if batch * length:
        acc = _TL[_acc_dtype(x_dbl, dt_weight)]

        def grid(meta):
            return (triton.cdiv(length, meta["BL"]), batch * k)

        _gather_xdbl_kernel[grid](
            x_dbl, dt_weight, idx, delta, bs, cs, length, dim, *x_dbl.stride(),
            K=k, R=r, N=n, RP=_pow2(r, 16), NP=_pow2(n), ACC=acc, **_meta(BL=64, BD=32),
        )  # fmt: skip
    return delta, bs, cs


class _GatherXdbl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_dbl, dt_weight, idx, out_dtype):  # type: ignore[override]
        dt_weight = dt_weight.contiguous()
        ctx.save_for_backward(x_dbl, dt_weight, idx)
        return _gather_x_dbl_fwd(x_dbl, dt_weight, idx, out_dtype)

    @staticmethod
    def backward(ctx, g_delta, g_b, g_c):  # type: ignore[override]
        x_dbl, dt_weight, idx = ctx.saved_tensors
        batch, length, k, e = x_dbl.shape
        dim, r = dt_weight.shape[1], dt_weight.shape[2]
        n = (e - r) // 2
        acc_t = _acc_dtype(x_dbl, dt_weight, g_delta)
        acc = _TL[acc_t]
        dx = torch.empty(batch, length, k, e, dtype=x_dbl.dtype, device=x_dbl.device)

        def grid(meta):
            return (triton.cdiv(length, meta["BL"]), batch * k)

        _gather_xdbl_bwd_kernel[grid](
            g_delta, g_b, g_c, dt_weight, idx, dx, length, dim,
            *g_delta.stride(), *g_b.stride(), *g_c.stride(),
            K=k, R=r, N=n, RP=_pow2(r, 16), NP=_pow2(n), ACC=acc, **_meta(BL=64, BD=32),
        )  # fmt: skip
        # ddt_weight: SPLIT partials so that about 4 programs per SM run, summed in torch
        n_cb_min = triton.cdiv(dim, 64)
        items = batch * triton.cdiv(length, 64)
        split = max(1, min(items, 4 * _num_sms(x_dbl.device) // max(1, k * n_cb_min)))
        part = torch.empty(split, k, dim, r, dtype=acc_t, device=x_dbl.device)

        def grid_w(meta):
            return (triton.cdiv(dim, meta["BD"]), k, split)

        _dt_weight_grad_kernel[grid_w](
            g_delta, x_dbl, idx, part, length, dim, batch, *g_delta.stride(), *x_dbl.stride(),
            K=k, R=r, RP=_pow2(r, 16), ACC=acc, **_meta(BL=64, BD=32),
        )  # fmt: skip
        return dx, part.sum(0).to(dt_weight.dtype), None, None


def gather_x_dbl(
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    idx: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mamba's per-direction inputs from x_dbl (B, L, K, R+2N) read in place through idx (K, L):
    delta (B, K*d, L) = dt_weight[k] (d, R) @ dt_low of token idx[k, p] (fp32 accumulation, no
    bias and no softplus: mamba fuses those), B and C (B, K, N, L) (group k serves direction k's
    channels). Written in `out_dtype` (default x_dbl's; mamba wants u's). Differentiable in x_dbl
    and dt_weight."""
    idx = idx.to(device=x_dbl.device, dtype=torch.int64).contiguous()
    return _GatherXdbl.apply(x_dbl, dt_weight, idx, out_dtype or x_dbl.dtype)


def csm_scan_mamba(
    u: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    idx: torch.Tensor,
    selective_scan_fn,
    inv: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CSM's S6 core (`vmddpm.ops.cross_scan`) through `selective_scan_fn` (mamba-ssm's
    signature, e.g. `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`): three Triton
    passes feed it (tokens -> (B, K*d, L), x_dbl -> delta, B, C) and one folds its output back. No
    dtype casts outside the kernels: the sequences are in u's dtype (bf16 under autocast), A, D and
    dt_bias go as given (views, no copies). Returns (B, L, d) in the dtype selective_scan_fn returns
    (u's)."""
    validate_csm_inputs(u, x_dbl, dt_weight, dt_bias, A, D, idx)
    k, dim, n = A.shape
    idx, inv = _tables(idx, inv, u.device)
    xs = _CrossScanTokens.apply(u, idx, inv)
    delta, bs, cs = _GatherXdbl.apply(x_dbl, dt_weight, idx, u.dtype)
    y = selective_scan_fn(
        xs,
        delta,
        A.reshape(k * dim, n),
        bs,
        cs,
        D=D.reshape(k * dim),
        delta_bias=dt_bias.reshape(k * dim),
        delta_softplus=True,
    )
    return _CrossMergeTokens.apply(y, idx, inv)


# ============================================================================= 2. fused scan
@triton.jit
def _affine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 then h -> a2 h + b2 (the scan's combine; with reverse=True the same
    function composes from the end, giving g_p = a_p g_{p+1} + b_p)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _log1p(x):
    # Goldberg's trick: exact to a few ulps without a libdevice log1p (the interpreter has none)
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / den))


@triton.jit
def _softplus(z):
    return tl.where(z > 20.0, z, _log1p(tl.exp(tl.minimum(z, 20.0))))


@triton.jit
def _softplus_grad(z):
    ez = tl.exp(tl.minimum(z, 20.0))
    return tl.where(z > 20.0, 1.0, ez / (1.0 + ez))


@triton.jit
def _row(x, i, T: tl.constexpr):
    """Row i of a (T, BD, NP) register tile, as (BD, NP)."""
    return tl.sum(tl.where((tl.arange(0, T) == i)[:, None, None], x, 0.0), axis=0)


@triton.jit
def _direction_params(
    w_ptr, bias_ptr, a_ptr, d_ptr, k, c, mc, nn, rr, DIM, R: tl.constexpr, N: tl.constexpr, ACC: tl.constexpr
):
    a_k = tl.load(
        a_ptr + (k * DIM + c[:, None]) * N + nn[None, :], mask=mc[:, None] & (nn < N)[None, :], other=0.0
    )
    w_k = tl.load(
        w_ptr + (k * DIM + c[:, None]) * R + rr[None, :], mask=mc[:, None] & (rr < R)[None, :], other=0.0
    )
    bias_k = tl.load(bias_ptr + k * DIM + c, mask=mc, other=0.0)
    d_k = tl.load(d_ptr + k * DIM + c, mask=mc, other=0.0)
    return a_k.to(ACC), w_k.to(ACC), bias_k.to(ACC), d_k.to(ACC)


@triton.jit
def _dt_tile(x_b, sx_l, sx_k, sx_e, j, mp, k, rr, w_k, bias_k, R: tl.constexpr, ACC: tl.constexpr):
    """dt_low (T, RP) of tokens j for direction k, z = dt_low W^T + bias (T, BD), dt = softplus(z)
    (0 at positions past L, so their decay is 1 and their input 0)."""
    row = x_b + j * sx_l + k * sx_k
    xr = tl.load(row[:, None] + rr[None, :] * sx_e, mask=mp[:, None] & (rr < R)[None, :], other=0.0).to(ACC)
    z = tl.dot(xr, tl.trans(w_k), input_precision="ieee", out_dtype=ACC) + bias_k[None, :]
    dt = tl.where(mp[:, None], _softplus(z), 0.0)
    return xr, z, dt


@triton.jit
def _tile(
    u_b, su_l, su_d, x_b, sx_l, sx_k, sx_e, idx_ptr, k, p, L, c, mc, nn, rr, a_k, w_k, bias_k, h0,
    R: tl.constexpr, N: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One tile of T positions of direction k from state h0 (BD, NP): its inputs and every state
    hs (T, BD, NP) = exp(dt A) h + dt B u, solved by an associative scan inside the tile."""
    mp = p < L
    j = tl.load(idx_ptr + k * L + p, mask=mp, other=0)
    m2 = mp[:, None] & mc[None, :]
    uu = tl.load(u_b + j[:, None] * su_l + c[None, :] * su_d, mask=m2, other=0.0).to(ACC)
    xr, z, dt = _dt_tile(x_b, sx_l, sx_k, sx_e, j, mp, k, rr, w_k, bias_k, R, ACC)
    row = x_b + j * sx_l + k * sx_k
    mn = mp[:, None] & (nn < N)[None, :]
    bt = tl.load(row[:, None] + (R + nn[None, :]) * sx_e, mask=mn, other=0.0).to(ACC)
    ct = tl.load(row[:, None] + (R + N + nn[None, :]) * sx_e, mask=mn, other=0.0).to(ACC)
    a = tl.exp(dt[:, :, None] * a_k[None, :, :])
    beta = (dt * uu)[:, :, None] * bt[:, None, :]
    aa, bb = tl.associative_scan((a, beta), 0, _affine)
    hs = aa * h0[None, :, :] + bb
    return j, mp, m2, uu, xr, z, dt, bt, ct, beta, hs


# Register budgets on sm_90 (ptxas -v, N = 16, T = 16, R = 8): forward BD=16 4 warps 128 regs,
# 8 warps 101; BD=32 8 warps 174, 16 warps 106; none spills. The backward holds ~15 (T, BD, N)
# tiles (T lives in each thread, so both scans are sequential per lane): 8 warps 245 regs, no
# spills; 4 warps spills, 16 warps (128-register cap) spills more.
_FWD_CONFIGS = [
    triton.Config({"BD": 16}, num_warps=4, num_stages=2),
    triton.Config({"BD": 16}, num_warps=4, num_stages=1),
    triton.Config({"BD": 16}, num_warps=8, num_stages=2),
    triton.Config({"BD": 32}, num_warps=8, num_stages=2),
    triton.Config({"BD": 32}, num_warps=16, num_stages=2),
]


@_tuned(_FWD_CONFIGS, key=["L", "DIM", "K", "R", "N", "T", "S"])
@triton.jit
def _csm_fwd_kernel(
    u_ptr, x_ptr, w_ptr, bias_ptr, a_ptr, d_ptr, idx_ptr, y_ptr, ws_ptr, ck_ptr,
    L, DIM, NSEG, su_b, su_l, su_d, sx_b, sx_l, sx_k, sx_e,
    K: tl.constexpr, R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
    T: tl.constexpr, S: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Program (channel block, batch): for each direction k in order, tiles of T positions along
    idx[k]; y accumulates over k token by token (ws: ACC partial sums, y itself when y is ACC)."""
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = pid_c * BD + tl.arange(0, BD)
    mc = c < DIM
    nn = tl.arange(0, NP)
    rr = tl.arange(0, RP)
    tt = tl.arange(0, T)
    mcn = mc[:, None] & (nn < N)[None, :]
    u_b = u_ptr + b * su_b
    x_b = x_ptr + b * sx_b
    y_b = y_ptr + b * L * DIM
    ws_b = ws_ptr + b * L * DIM
    out_t = y_ptr.dtype.element_ty
    for k in range(K):
        a_k, w_k, bias_k, d_k = _direction_params(
            w_ptr, bias_ptr, a_ptr, d_ptr, k, c, mc, nn, rr, DIM, R, N, ACC
        )
        ck_k = ck_ptr + (b * K + k) * NSEG * DIM * N + c[:, None] * N + nn[None, :]
        h = tl.zeros((BD, NP), dtype=ACC)
        for ti in tl.range(0, NSEG * S):
            # the state entering each chunk of S tiles is the backward's checkpoint
            tl.store(ck_k + (ti // S) * DIM * N, h, mask=mcn & (ti % S == 0))
            p = ti * T + tt
            j, _, m2, uu, _, _, _, _, ct, _, hs = _tile(
                u_b, su_l, su_d, x_b, sx_l, sx_k, sx_e, idx_ptr, k, p, L, c, mc, nn, rr,
                a_k, w_k, bias_k, h, R, N, ACC,
            )  # fmt: skip
            h = _row(hs, T - 1, T)
            yk = tl.sum(hs * ct[:, None, :], axis=2) + d_k[None, :] * uu
            tok = j[:, None] * DIM + c[None, :]
            acc = yk + tl.load(ws_b + tok, mask=m2 & (k > 0), other=0.0)
            tl.store(y_b + tok, acc.to(out_t), mask=m2 & (k == K - 1))
            tl.store(ws_b + tok, acc, mask=m2 & (k < K - 1))
        # the next direction reads partial sums that other threads of this program wrote
        tl.debug_barrier()


_BWD_CONFIGS = [
    triton.Config({}, num_warps=8, num_stages=1),
    triton.Config({}, num_warps=8, num_stages=2),
]


@_tuned(_BWD_CONFIGS, key=["L", "DIM", "K", "R", "N", "T", "S", "BD"])
@triton.jit
def _csm_bwd_kernel(
    u_ptr, x_ptr, w_ptr, bias_ptr, a_ptr, d_ptr, idx_ptr, ck_ptr, dy_ptr,
    du_ptr, duws_ptr, dx_ptr, da_ptr, dd_ptr, db_ptr, dw_ptr, hb_ptr,
    L, DIM, NSEG, NB, su_b, su_l, su_d, sx_b, sx_l, sx_k, sx_e, sg_b, sg_l, sg_d,
    K: tl.constexpr, R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
    T: tl.constexpr, S: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Program (channel block cb, batch b), directions in order, chunks of S tiles in reverse.

    Writes: du (via duws like the forward's y), dx partial [cb, b] (every (j, k) row once), and
    per-(b, k, channel) partials of dA, dD, ddt_bias, ddt_weight."""
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ncb = tl.num_programs(0)
    E: tl.constexpr = R + 2 * N
    c = pid_c * BD + tl.arange(0, BD)
    mc = c < DIM
    nn = tl.arange(0, NP)
    rr = tl.arange(0, RP)
    tt = tl.arange(0, T)
    mcn = mc[:, None] & (nn < N)[None, :]
    u_b = u_ptr + b * su_b
    x_b = x_ptr + b * sx_b
    dy_b = dy_ptr + b * sg_b
    du_b = du_ptr + b * L * DIM
    duws_b = duws_ptr + b * L * DIM
    dx_b = dx_ptr + (pid_c * NB + b) * L * K * E
    hb = hb_ptr + (b * ncb + pid_c) * S * BD * NP + tl.arange(0, BD)[:, None] * NP + nn[None, :]
    out_t = du_ptr.dtype.element_ty
    for k in range(K):
        a_k, w_k, bias_k, d_k = _direction_params(
            w_ptr, bias_ptr, a_ptr, d_ptr, k, c, mc, nn, rr, DIM, R, N, ACC
        )
        ck_k = ck_ptr + (b * K + k) * NSEG * DIM * N + c[:, None] * N + nn[None, :]
        acc_a = tl.zeros((BD, NP), dtype=ACC)
        acc_w = tl.zeros((BD, RP), dtype=ACC)
        acc_d = tl.zeros((BD,), dtype=ACC)
        acc_b = tl.zeros((BD,), dtype=ACC)
        g_next = tl.zeros((BD, NP), dtype=ACC)  # adjoint of the state at the position after the tile
        for sr in range(NSEG):
            seg = NSEG - 1 - sr
            # pass 1: the states entering each tile of this chunk, from its checkpoint
            h = tl.load(ck_k + seg * DIM * N, mask=mcn, other=0.0)
            for i in range(S - 1):
                tl.store(hb + i * BD * NP, h)
                p = (seg * S + i) * T + tt
                _, _, _, _, _, _, _, _, _, _, hs = _tile(
                    u_b, su_l, su_d, x_b, sx_l, sx_k, sx_e, idx_ptr, k, p, L, c, mc, nn, rr,
                    a_k, w_k, bias_k, h, R, N, ACC,
                )  # fmt: skip
                h = _row(hs, T - 1, T)
            tl.store(hb + (S - 1) * BD * NP, h)
            tl.debug_barrier()
            # pass 2: tiles in reverse; states again, then the adjoint recurrence and every gradient
            for i2 in tl.range(0, S):
                i = S - 1 - i2
                p = (seg * S + i) * T + tt
                h0 = tl.load(hb + i * BD * NP)
                j, mp, m2, uu, xr, z, dt, bt, ct, beta, hs = _tile(
                    u_b, su_l, su_d, x_b, sx_l, sx_k, sx_e, idx_ptr, k, p, L, c, mc, nn, rr,
                    a_k, w_k, bias_k, h0, R, N, ACC,
                )  # fmt: skip
                # what needs the states, first (so hs and beta die before the adjoint scan)
                gy = tl.load(dy_b + j[:, None] * sg_l + c[None, :] * sg_d, mask=m2, other=0.0).to(ACC)
                row = dx_b + (j * K + k) * E
                mn = mp[:, None] & (nn < N)[None, :]
                tl.store(row[:, None] + R + N + nn[None, :], tl.sum(gy[:, :, None] * hs, axis=1), mask=mn)
                hm = hs - beta  # = a_p h_{p-1}
                # decay at the next position (p + 1), from a shifted load: exp(dt_{p+1} A)
                p1 = p + 1
                mp1 = p1 < L
                j1 = tl.load(idx_ptr + k * L + p1, mask=mp1, other=0)
                _, _, dt1 = _dt_tile(x_b, sx_l, sx_k, sx_e, j1, mp1, k, rr, w_k, bias_k, R, ACC)
                a1 = tl.exp(dt1[:, :, None] * a_k[None, :, :])
                e = gy[:, :, None] * ct[:, None, :]
                mm, ee = tl.associative_scan((a1, e), 0, _affine, reverse=True)
                g = ee + mm * g_next[None, :, :]  # g_p = C_p dy_p + a_{p+1} g_{p+1}
                g_next = _row(g, 0, T)
                tl.store(row[:, None] + R + nn[None, :], tl.sum(g * (dt * uu)[:, :, None], axis=1), mask=mn)
                gb = tl.sum(g * bt[:, None, :], axis=2)  # (T, BD)
                gh = g * hm
                acc_a += tl.sum(gh * dt[:, :, None], axis=0)
                ddt = gb * uu + tl.sum(gh * a_k[None, :, :], axis=2)
                du_t = gb * dt + d_k[None, :] * gy
                acc_d += tl.sum(gy * uu, axis=0)
                dz = tl.where(m2, ddt * _softplus_grad(z), 0.0)
                acc_b += tl.sum(dz, axis=0)
                acc_w += tl.dot(tl.trans(dz), xr, input_precision="ieee", out_dtype=ACC)
                dxr = tl.dot(dz, w_k, input_precision="ieee", out_dtype=ACC)  # (T, RP)
                tl.store(row[:, None] + rr[None, :], dxr, mask=mp[:, None] & (rr < R)[None, :])
                tok = j[:, None] * DIM + c[None, :]
                dacc = du_t + tl.load(duws_b + tok, mask=m2 & (k > 0), other=0.0)
                tl.store(du_b + tok, dacc.to(out_t), mask=m2 & (k == K - 1))
                tl.store(duws_b + tok, dacc, mask=m2 & (k < K - 1))
            # the next chunk's pass 1 overwrites the scratch states other threads just read
            tl.debug_barrier()
        kc = (b * K + k) * DIM + c
        tl.store(da_ptr + kc[:, None] * N + nn[None, :], acc_a, mask=mcn)
        tl.store(dw_ptr + kc[:, None] * R + rr[None, :], acc_w, mask=mc[:, None] & (rr < R)[None, :])
        tl.store(dd_ptr + kc, acc_d, mask=mc)
        tl.store(db_ptr + kc, acc_b, mask=mc)


@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, numel, NPART, BLOCK: tl.constexpr):
    """out = sum_i part[i] in a fixed order, written in out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    ptr = part_ptr + offs
    acc = tl.load(ptr, mask=m, other=0.0)
    for _ in range(1, NPART):
        ptr += numel
        acc += tl.load(ptr, mask=m, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def _check_blocks(tile: int, chunk: int) -> None:
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"csm_scan_triton: tile must be a power of two >= 16, got {tile}")
    if chunk < tile or chunk % tile:
        raise ValueError(f"csm_scan_triton: chunk must be a positive multiple of tile={tile}, got {chunk}")


class _CsmScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, x_dbl, dt_weight, dt_bias, A, D, idx, tile, chunk):  # type: ignore[override]
        batch, length, dim = u.shape
        k, _, n = A.shape
        r = dt_weight.shape[2]
        acc_t = _acc_dtype(u, x_dbl, dt_weight, dt_bias, A, D)
        w, bias, a, d = (t.contiguous() for t in (dt_weight, dt_bias, A, D))
        s = chunk // tile
        nseg = triton.cdiv(length, chunk)
        y = torch.empty(batch, length, dim, dtype=u.dtype, device=u.device)
        ws = y if (y.dtype == acc_t or k == 1) else torch.empty(y.shape, dtype=acc_t, device=u.device)
        ckpt = torch.empty(batch, k, nseg, dim, n, dtype=acc_t, device=u.device)
        if y.numel():

            def grid(meta):
                return (triton.cdiv(dim, meta["BD"]), batch)

            _csm_fwd_kernel[grid](
                u, x_dbl, w, bias, a, d, idx, y, ws, ckpt, length, dim, nseg,
                *u.stride(), *x_dbl.stride(),
                K=k, R=r, N=n, RP=_pow2(r, 16), NP=_pow2(n), T=tile, S=s, ACC=_TL[acc_t],
                **_meta(BD=16),
            )  # fmt: skip
        ctx.save_for_backward(u, x_dbl, w, bias, a, d, idx, ckpt)
        ctx.blocks = (tile, chunk)
        ctx.dtypes = (dt_weight.dtype, dt_bias.dtype, A.dtype, D.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        u, x_dbl, w, bias, a, d, idx, ckpt = ctx.saved_tensors
        tile, chunk = ctx.blocks
        batch, length, dim = u.shape
        k, _, n = a.shape
        r = w.shape[2]
        e = r + 2 * n
        acc_t = ckpt.dtype
        dev = u.device
        s = chunk // tile
        nseg = ckpt.shape[2]
        ncb = triton.cdiv(dim, BD_BWD)
        np_ = _pow2(n)
        du = torch.empty(batch, length, dim, dtype=u.dtype, device=dev)
        duws = du if (du.dtype == acc_t or k == 1) else torch.empty(du.shape, dtype=acc_t, device=dev)
        dx_part = torch.empty(ncb, batch, length, k, e, dtype=acc_t, device=dev)
        da = torch.empty(batch, k, dim, n, dtype=acc_t, device=dev)
        dd = torch.empty(batch, k, dim, dtype=acc_t, device=dev)
        db = torch.empty(batch, k, dim, dtype=acc_t, device=dev)
        dw = torch.empty(batch, k, dim, r, dtype=acc_t, device=dev)
        hbuf = torch.empty(batch * ncb, s, BD_BWD, np_, dtype=acc_t, device=dev)
        if du.numel():
            _csm_bwd_kernel[(ncb, batch)](
                u, x_dbl, w, bias, a, d, idx, ckpt, dy, du, duws, dx_part, da, dd, db, dw, hbuf,
                length, dim, nseg, batch, *u.stride(), *x_dbl.stride(), *dy.stride(),
                K=k, R=r, N=n, RP=_pow2(r, 16), NP=np_, T=tile, S=s, BD=BD_BWD, ACC=_TL[acc_t],
            )  # fmt: skip
        dx = torch.empty(batch, length, k, e, dtype=x_dbl.dtype, device=dev)
        if dx.numel():
            block = 1024
            _sum_parts_kernel[(triton.cdiv(dx.numel(), block),)](dx_part, dx, dx.numel(), ncb, BLOCK=block)
        w_t, bias_t, a_t, d_t = ctx.dtypes
        return (
            du,
            dx,
            dw.sum(0).to(w_t),
            db.sum(0).to(bias_t),
            da.sum(0).to(a_t),
            dd.sum(0).to(d_t),
            None,
            None,
            None,
        )


def csm_scan_triton(
    u: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    idx: torch.Tensor,
    *,
    tile: int = TILE,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """The CSM's S6 core (`vmddpm.ops.cross_scan`, same arguments) as one fused Triton kernel per
    direction of autograd (see the module docstring): y (B, L, d) in u's dtype, gradients for u,
    x_dbl, dt_weight, dt_bias, A and D. `tile` (positions per register tile, power of two >= 16)
    and `chunk` (positions between saved states, a multiple of tile) are kernel sizes: the
    backward keeps (B, K, L/chunk, d, N) fp32 states."""
    validate_csm_inputs(u, x_dbl, dt_weight, dt_bias, A, D, idx)
    _check_blocks(tile, chunk)
    idx = idx.to(device=u.device, dtype=torch.int64).contiguous()
    return _CsmScanTriton.apply(u, x_dbl, dt_weight, dt_bias, A, D, idx, tile, chunk)
