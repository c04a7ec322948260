"""S6 selective scan (Mamba): the readable sequential reference.

Interim file written by the lead so the networks can run; the ops helper replaces it with the full
backend set (pscan, cpu, cuda).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("ref", "pscan")


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    if name == "auto":
        return "pscan"
    if name in BACKENDS:
        return name
    raise ValueError(f"selective_scan: backend {name!r} is not available here; available: {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    return list(BACKENDS)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    resolve_backend(backend, u.device)
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    n = A.shape[1]
    B, C = B.float(), C.float()
    if B.dim() == 4:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)  # (b, d, n, l)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u) if B.dim() == 3 else torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if resolve_backend(backend, u.device) == "pscan":
        hs = _hillis_steele(dA, dBu)  # (b, d, l, n)
        y = torch.einsum("bdln,bnl->bdl", hs, C) if C.dim() == 3 else torch.einsum("bdln,bdnl->bdl", hs, C)
        x = hs[:, :, -1]
        out = y if D is None else y + u * D[:, None].float()
        if z is not None:
            out = out * F.silu(z.float())
        out = out.to(dtype_in)
        return (out, x) if return_last_state else out
    x = u.new_zeros(batch, dim, n)
    ys = []
    for i in range(L):
        x = dA[:, :, i] * x + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]) if C.dim() == 3 else torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None].float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def _hillis_steele(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of x_t = a_t x_{t-1} + b_t along dim 2 in log2(L) doubling steps (any L)."""
    length, k = a.shape[2], 1
    while k < length:
        a_prev = F.pad(a[:, :, :-k], (0, 0, k, 0), value=1.0)
        b_prev = F.pad(b[:, :, :-k], (0, 0, k, 0), value=0.0)
        b = a * b_prev + b
        a = a * a_prev
        k *= 2
    return b
