"""The Cross-Scan Module's S6 core as one op: cross-scan, Sequence Regeneration, dt projection,
the four selective scans and cross-merge, defined on the 2-D map's tokens in place.

Why one op: VMamba's SS2D materialises four copies of the map in scan order (cross-scan), runs S6
on a (batch, 4*d, L) tensor and folds the four outputs back (cross-merge); every step of that is a
full-size copy, and the per-direction projections, dtype casts and layout changes around it are
more copies. Here the scan order is an index table and everything else is arithmetic inside the
kernel: the only full-size tensors are the input tokens `u` and the output `y`.

Definition (K directions, the SR order of direction k given by `idx[k]`)::

    for every batch b, direction k, channel d, and sequence position p = 0 .. L-1 (token j = idx[k, p]):
        dt   = softplus(dt_bias[k, d] + sum_r dt_weight[k, d, r] * x_dbl[b, j, k, r])
        h_p  = exp(dt * A[k, d, :]) * h_{p-1} + dt * x_dbl[b, j, k, R:R+N] * u[b, j, d]     h_{-1} = 0
        y[b, j, d] += <x_dbl[b, j, k, R+N:R+2N], h_p> + D[k, d] * u[b, j, d]

Shapes: u (batch, L, d) channel-last tokens of the (H, W) map in row-major order (L = H*W);
x_dbl (batch, L, K, R + 2N), each token's projection per direction: [dt_low | B | C];
dt_weight (K, d, R); dt_bias, D (K, d); A (K, d, N) (negative: the decays); idx (K, L) int64, each
row a permutation. Returns y (batch, L, d) in u's dtype; the state is float32 (float64 when an
input is float64), whatever the input dtype, as in mamba-ssm.

Backends (`csm_scan(..., backend=...)`):
- `ref`: the definition through `selective_scan_ref` on gathered sequences (readable, slow).
- `pscan`: the same gathers around the pure-PyTorch S6 scan (any device, memory-bounded).
- `cpu`: the fused numba kernels of `vmddpm/ops/csm_kernels.py` (tokens read through `idx`; dt
  projection, softplus, D skip and merge fused; parallel over batch x channel blocks).
- `cuda`: mamba-ssm's CUDA selective scan fed and folded by the Triton cross-scan / cross-merge
  kernels of `vmddpm/ops/csm_triton.py` (no torch copies or casts around it).
- `triton`: the fused Triton scan of `vmddpm/ops/csm_triton.py` (a GPU without mamba-ssm).
- `auto`: CPU tensors: cpu when numba imports, else pscan; CUDA tensors: cuda when mamba-ssm and
  Triton import (and `torch.use_deterministic_algorithms` is off: mamba-ssm's backward sums dB,
  dC with atomics), else triton when Triton does, else pscan. `explain_csm_backend` says why.
  Every backend but `cuda` is deterministic.
"""

from __future__ import annotations

import functools
import logging

import torch

from vmddpm.ops import selective_scan as s6
from vmddpm.ops.csm_shapes import validate_csm_inputs

log = logging.getLogger(__name__)

CSM_BACKENDS: tuple[str, ...] = ("ref", "pscan", "cpu", "cuda", "triton")


@functools.lru_cache(maxsize=1)
def _triton_reason() -> str | None:
    """None when the Triton kernels can be imported, else why not."""
    try:
        from vmddpm.ops import csm_triton  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton without a usable backend
        return f"Triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why CSM backend `name` cannot run on `device` (None when it can)."""
    if name in ("ref", "pscan"):
        return None
    if name == "cpu":
        return s6._unavailable_reason("cpu", device)
    if name == "cuda":
        if torch.are_deterministic_algorithms_enabled():
            return "deterministic mode is on and mamba-ssm's backward adds with atomics (use triton)"
        return s6._unavailable_reason("cuda", device) or _triton_reason()
    if name == "triton":
        if device.type != "cuda":
            return f"it runs on CUDA tensors only, got device {device}"
        return _triton_reason()
    return f"unknown backend; choose one of auto, {', '.join(CSM_BACKENDS)}"


def explain_csm_backend(name: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """(backend, why): the concrete backend `name` means on `device` and the reason, for the log line
    of every run (`auto` names what it passed over and why)."""
    dev = torch.device(device)
    if name != "auto":
        why = _unavailable_reason(name, dev)
        if why is not None:
            raise ValueError(f"csm_scan: backend {name!r} cannot run: {why}")
        return name, f"{name}: chosen in model.scan_backend"
    skipped = []
    for cand in ("cpu", "pscan") if dev.type == "cpu" else ("cuda", "triton", "pscan"):
        why = _unavailable_reason(cand, dev)
        if why is None:
            passed = f" ({'; '.join(skipped)})" if skipped else ""
            return cand, f"auto on {dev.type}: {cand}{passed}"
        skipped.append(f"not {cand}: {why}")
    raise AssertionError("pscan always runs")


def resolve_csm_backend(name: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend `name` means on `device` (see the module docstring); ValueError naming the
    backend and why when an explicit one cannot run there."""
    return explain_csm_backend(name, device)[0]


def csm_scan(
    u: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    idx: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """The CSM's four selective scans over the SR orders `idx`, merged; see the module docstring."""
    validate_csm_inputs(u, x_dbl, dt_weight, dt_bias, A, D, idx)
    name = resolve_csm_backend(backend, u.device)
    if name == "cpu":
        from vmddpm.ops.csm_cpu import csm_scan_cpu

        return csm_scan_cpu(u, x_dbl, dt_weight, dt_bias, A, D, idx)
    if name == "cuda":
        from vmddpm.ops.csm_triton import csm_scan_mamba

        return csm_scan_mamba(u, x_dbl, dt_weight, dt_bias, A, D, idx, s6._mamba_ssm_fn())
    if name == "triton":
        from vmddpm.ops.csm_triton import csm_scan_triton

        return csm_scan_triton(u, x_dbl, dt_weight, dt_bias, A, D, idx)
    return csm_scan_gathered(u, x_dbl, dt_weight, dt_bias, A, D, idx, backend=name)


def csm_scan_gathered(
    u: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    idx: torch.Tensor,
    backend: str = "ref",
) -> torch.Tensor:
    """The definition as VMamba computes it: gather the K sequences, run `selective_scan` (any S6
    backend; `ref` makes this the oracle of every fused kernel), scatter back and sum."""
    batch, length, dim = u.shape
    k, _, n = A.shape
    r = dt_weight.shape[2]
    seq = idx.to(u.device)
    xs = u.transpose(1, 2)[:, :, seq].transpose(1, 2)  # (batch, K, d, L) in each direction's order
    xd = x_dbl.permute(0, 2, 3, 1)  # (batch, K, R + 2N, L)
    xd = torch.gather(xd, 3, seq[None, :, None, :].expand(batch, k, r + 2 * n, length))
    dts = torch.einsum("bkrl,kdr->bkdl", xd[:, :, :r], dt_weight.to(xd.dtype))
    y = s6.selective_scan(
        xs.reshape(batch, k * dim, length),
        dts.reshape(batch, k * dim, length),
        A.reshape(k * dim, n),
        xd[:, :, r : r + n].contiguous(),  # (batch, K, N, L): group k serves direction k's channels
        xd[:, :, r + n :].contiguous(),
        D=D.reshape(-1),
        delta_bias=dt_bias.reshape(-1),
        delta_softplus=True,
        backend=backend,
    ).view(batch, k, dim, length)
    inv = torch.argsort(seq, dim=1)  # token j of direction k sits at sequence position inv[k, j]
    merged = torch.gather(y, 3, inv[None, :, None, :].expand(batch, k, dim, length)).sum(1)
    return merged.transpose(1, 2).to(u.dtype)
