"""S6 selective scan (Mamba): one entry point, several interchangeable backends.

`selective_scan` has exactly the signature and semantics of mamba-ssm's `selective_scan_fn`
(`mamba_ssm/ops/selective_scan_interface.py`, whose `selective_scan_ref` is the definition)::

    delta' = softplus(delta + delta_bias)            (each part optional)
    x_t    = exp(delta'_t * A) * x_{t-1} + delta'_t * B_t * u_t      x_{-1} = 0, per (batch, dim, n)
    y_t    = <C_t, x_t> + D * u_t
    out    = y * silu(z)                             (if z is given)

Shapes: u, delta, z (batch, dim, L); A (dim, N) real; B, C (batch, N, L), (batch, groups, N, L)
(input-dependent, `dim % groups == 0`; group g serves channels [g*dim/groups, (g+1)*dim/groups)), or
(dim, N) (constant); D, delta_bias (dim,). The state is computed in float32 (float64 when an input
is float64, so that tests can compare backends at 1e-10); the output has u's dtype; the optional
last state (batch, dim, N) stays in the compute dtype, as in mamba-ssm.

Why several backends: the CUDA kernel of mamba-ssm is the fast path but exists only on NVIDIA GPUs
with a matching build; everything else (CPU training of the demo, CI, laptops) needs a scan that is
exact and not hopelessly slow. Every backend is checked against `ref` in `tests/test_selective_scan.py`
(outputs and gradients of every input).

- `ref`: sequential loop, the readable definition (slow; the oracle).
- `pscan`: pure PyTorch, any torch device: the whole op as one function, chunked over L with
  recomputation in its backward, so its memory does not grow with L (`vmddpm.ops.scan_pscan`).
- `cpu`: fused numba kernel (parallel over batch x dim) with its own backward; CPU tensors only.
- `cuda`: mamba-ssm's `selective_scan_fn`; CUDA tensors with `mamba_ssm` importable.
- `auto`: cuda -> cpu -> pscan, the first that can run on the tensors' device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vmddpm.ops.scan_pscan import no_autocast, selective_scan_pscan
from vmddpm.signals import deferred

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("ref", "pscan", "cpu", "cuda")


# ------------------------------------------------------------------------------------ availability
@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn():
    """mamba-ssm's `selective_scan_fn`, or the reason it cannot be imported (a string)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or a CUDA extension that fails to load
        return f"mamba_ssm is not importable ({type(exc).__name__}: {exc})"
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def _numba_reason() -> str | None:
    """None when the numba CPU kernel can be used, else why not.

    numba's OpenMP layer sizes the process-wide OpenMP pool to NUMBA_NUM_THREADS (default: every
    core) when it starts, which also resizes torch's intra-op pool: a Snakemake job given one thread
    (OMP_NUM_THREADS=1) would then run torch on every core, beside the other jobs. So numba gets
    torch's thread count unless the user chose one. Only before numba's import: numba re-reads its
    environment on every compilation and refuses a NUMBA_NUM_THREADS that differs from its running
    pool (then `_keep_torch_threads` repairs torch's pool instead).
    """
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))
    try:
        import numba  # noqa: F401
    except Exception as exc:
        return f"numba is not importable ({type(exc).__name__}: {exc})"
    return None


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device` (None when it can)."""
    if name in ("ref", "pscan"):
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors only, got device {device}"
        return _numba_reason()
    if name == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors only, got device {device}"
        fn = _mamba_ssm_fn()
        return fn if isinstance(fn, str) else None
    return f"unknown backend; choose one of auto, {', '.join(BACKENDS)}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device` (default CPU), fastest last-resort order as listed."""
    dev = torch.device(device)
    return [b for b in BACKENDS if _unavailable_reason(b, dev) is None]


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend `name` means on `device`: `auto` becomes cuda -> cpu -> pscan (the first
    that can run there); an explicit name is returned as is when it can run, else ValueError
    naming the backend and why (callers log the resolved name)."""
    dev = torch.device(device)
    if name == "auto":
        for cand in ("cuda", "cpu", "pscan"):
            if _unavailable_reason(cand, dev) is None:
                return cand
        return "pscan"  # unreachable: pscan always runs
    why = _unavailable_reason(name, dev)
    if why is not None:
        raise ValueError(f"selective_scan: backend {name!r} cannot run: {why}")
    return name


# --------------------------------------------------------------------------------------- validation
def _debug_enabled(debug: bool | None) -> bool:
    if debug is not None:
        return debug
    return os.environ.get("VMDDPM_DEBUG", "") not in ("", "0", "false", "False")


def _shape_error(name: str, expected: str, t: torch.Tensor) -> ValueError:
    return ValueError(f"selective_scan: {name} must be {expected}, got {tuple(t.shape)}")


def _validate(u, delta, A, B, C, D, z, delta_bias, debug: bool) -> None:
    """ValueError naming the input and the expected shape; with `debug`, also non-finite values."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise _shape_error(
            "u", "(batch, dim, L)", torch.as_tensor(u) if not isinstance(u, torch.Tensor) else u
        )
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise _shape_error("delta", f"(batch, dim, L) = {tuple(u.shape)} like u", delta)
    if A.dim() != 2 or A.shape[0] != dim:
        raise _shape_error("A", f"(dim, N) with dim = {dim}", A)
    if A.is_complex():
        raise ValueError("selective_scan: A must be real; complex A is not supported")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        ok = (
            (m.dim() == 2 and tuple(m.shape) == (dim, n))
            or (m.dim() == 3 and tuple(m.shape) == (batch, n, length))
            or (
                m.dim() == 4
                and m.shape[0] == batch
                and m.shape[2:] == (n, length)
                and m.shape[1] >= 1
                and dim % m.shape[1] == 0
            )
        )
        if not ok:
            raise _shape_error(
                name,
                f"(batch, N, L) = {(batch, n, length)}, (batch, groups, N, L) with dim % groups == 0 "
                f"(dim = {dim}), or (dim, N) = {(dim, n)}",
                m,
            )
        if m.is_complex():
            raise ValueError(f"selective_scan: {name} must be real; complex B/C are not supported")
    if D is not None and tuple(D.shape) != (dim,):
        raise _shape_error("D", f"(dim,) = ({dim},)", D)
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise _shape_error("delta_bias", f"(dim,) = ({dim},)", delta_bias)
    if z is not None and z.shape != u.shape:
        raise _shape_error("z", f"(batch, dim, L) = {tuple(u.shape)} like u", z)
    if debug:
        named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
        for name, t in named.items():
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"selective_scan: {name} has non-finite values (NaN or inf)")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (fp16/bf16 inputs are upcast)."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


# ------------------------------------------------------------------------------------- entry point
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
    debug: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """S6 selective scan; see the module docstring for the definition and shapes.

    Returns `out` (batch, dim, L) in u's dtype, or `(out, last_state)` with `return_last_state`.
    `debug` (default: env `VMDDPM_DEBUG=1`) also checks every input for NaN/inf.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, _debug_enabled(debug))
    name = resolve_backend(backend, u.device)
    if name == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "cuda":
        fn = _mamba_ssm_fn()
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "pscan":  # the whole op, fused and chunked: vmddpm/ops/scan_pscan.py
        out, last = selective_scan_pscan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last) if return_last_state else out

    # cpu: the backend computes the core scan y_t = <C_t, x_t>; the cheap (batch, dim, L) parts
    # around it (delta bias/softplus, D skip, z gate, dtype casts) are plain torch + autograd.
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    batch, dim, length = u.shape
    uf, dt = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bg, Cg = _as_groups(B, batch, dim, length, cdt), _as_groups(C, batch, dim, length, cdt)
    core = _CORES[name]
    y, last = core(uf, dt, A.to(cdt), Bg, Cg)
    out = y if D is None else y + uf * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out


def _as_groups(m: torch.Tensor, batch: int, dim: int, length: int, cdt: torch.dtype) -> torch.Tensor:
    """B or C as (batch, groups, N, L) in the compute dtype (groups = 1 for (batch, N, L); a constant
    (dim, N) becomes one group per channel, broadcast over batch and L)."""
    m = m.to(cdt)
    if m.dim() == 3:
        return m[:, None]
    if m.dim() == 2:
        return m[None, :, :, None].expand(batch, dim, m.shape[1], length)
    return m


# --------------------------------------------------------------------------------------------- ref
def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The readable definition: mamba-ssm's `selective_scan_ref`, step by step (slow, exact, autograd).

    Autocast is off inside: every step (softplus, the einsums, the C contraction, D, z) runs in the
    compute dtype and the output is rounded once, to u's dtype; the z gate is computed in it too
    (mamba-ssm's own reference computes silu(z) in z's dtype, its CUDA kernel in float32).
    """
    with no_autocast(u.device):
        return _ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, A = u.to(cdt), delta.to(cdt), A.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    B, C = _as_groups(B, batch, dim, length, cdt), _as_groups(C, batch, dim, length, cdt)
    B = B.repeat_interleave(dim // B.shape[1], dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind, not indexing per step: its backward stacks the L step gradients once, where L index
    # backwards would each materialise a full-size zero gradient (quadratic in L)
    for da, dbu, c in zip(delta_a.unbind(2), delta_b_u.unbind(2), C.unbind(3), strict=True):
        x = da * x + dbu
        ys.append(torch.einsum("bdn,bdn->bd", x, c))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(batch, dim, 0)
    out = y if D is None else y + u * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


# --------------------------------------------------------------------------------------------- cpu
CPU_CHUNK = 64
"""Steps between the state checkpoints of the CPU kernel (a kernel tile size, not a model knob):
the backward recomputes at most this many states per (batch, channel) from the checkpoint."""


def _match_numba_threads() -> int:
    """Run the numba kernel on as many threads as torch's intra-op pool (returned): a job that
    Snakemake gives one thread (OMP_NUM_THREADS=1, which torch honours and numba does not) must not
    spread over every core beside the other jobs. See `_keep_torch_threads` for the other half."""
    import numba

    n = torch.get_num_threads()
    want = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    return n


def _keep_torch_threads(n: int) -> None:
    """numba's first parallel launch sizes the shared OpenMP runtime to NUMBA_NUM_THREADS, which
    silently widens torch's pool too (when numba was imported before `_numba_reason` could set it):
    put torch back to the `n` threads it had."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def numba_region() -> Iterator[int]:
    """Run numba kernels on as many threads as torch's pool (yielded), a Ctrl-C inside one taking
    effect after it (vmddpm.signals): `_match_numba_threads`, `deferred` and `_keep_torch_threads`
    around the kernel calls."""
    threads = _match_numba_threads()
    with deferred():
        yield threads
    _keep_torch_threads(threads)


class _CpuScan(torch.autograd.Function):
    """The numba kernels of `vmddpm.ops.scan_cpu` as an autograd function (B/C as (batch, G, N, L))."""

    @staticmethod
    def forward(ctx, u, dt, A, Bg, Cg):
        from vmddpm.ops import scan_cpu

        def arr(t: torch.Tensor):
            return t.detach().contiguous().numpy()

        u_, dt_, A_ = arr(u), arr(dt), arr(A)
        bt, ct = arr(Bg.transpose(2, 3)), arr(Cg.transpose(2, 3))  # (batch, G, L, N)
        with numba_region():
            y, last, ckpt = scan_cpu.scan_fwd(u_, dt_, A_, bt, ct, CPU_CHUNK)
        ctx.arrays = (u_, dt_, A_, bt, ct, ckpt)
        return torch.from_numpy(y), torch.from_numpy(last)

    @staticmethod
    def backward(ctx, dy, dlast):
        from vmddpm.ops import scan_cpu

        u_, dt_, A_, bt, ct, ckpt = ctx.arrays
        dy_ = np.zeros_like(u_) if dy is None else dy.detach().contiguous().numpy()
        if dlast is None:
            dlast_ = np.zeros((u_.shape[0], u_.shape[1], A_.shape[1]), dtype=u_.dtype)
        else:
            dlast_ = dlast.detach().contiguous().numpy()
        with numba_region():
            du, ddt, da, db, dc = scan_cpu.scan_bwd(u_, dt_, A_, bt, ct, ckpt, dy_, dlast_, CPU_CHUNK)
        t = torch.from_numpy
        return t(du), t(ddt), t(da).sum(0), t(db).transpose(2, 3), t(dc).transpose(2, 3)


def _cpu_core(u, dt, A, Bg, Cg):
    """Core scan with the fused numba kernel; B and C get a common number of groups first (the
    kernel indexes both with one group id)."""
    if Bg.shape[1] != Cg.shape[1]:
        dim = u.shape[1]
        Bg = Bg.repeat_interleave(dim // Bg.shape[1], dim=1)
        Cg = Cg.repeat_interleave(dim // Cg.shape[1], dim=1)
    return _CpuScan.apply(u, dt, A, Bg, Cg)


_CORES = {"cpu": _cpu_core}
