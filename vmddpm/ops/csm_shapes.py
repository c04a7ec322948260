"""Shape checks of the CSM op's inputs (`vmddpm/ops/cross_scan.py`), shared by every backend's entry
point so that a wrong shape is the same one-line error whichever backend runs."""

from __future__ import annotations

import torch


def _shape_error(name: str, expected: str, t: torch.Tensor) -> ValueError:
    return ValueError(f"csm_scan: {name} must be {expected}, got {tuple(t.shape)}")


def validate_csm_inputs(u, x_dbl, dt_weight, dt_bias, A, D, idx) -> None:
    """ValueError naming the input and its expected shape."""
    if u.dim() != 3:
        raise _shape_error("u", "(batch, L, d)", u)
    batch, length, dim = u.shape
    if A.dim() != 3 or A.shape[1] != dim:
        raise _shape_error("A", f"(K, d, N) with d = {dim}", A)
    k, _, n = A.shape
    if dt_weight.dim() != 3 or tuple(dt_weight.shape[:2]) != (k, dim):
        raise _shape_error("dt_weight", f"(K, d, R) with K, d = {k}, {dim}", dt_weight)
    r = dt_weight.shape[2]
    if tuple(x_dbl.shape) != (batch, length, k, r + 2 * n):
        raise _shape_error("x_dbl", f"(batch, L, K, R + 2N) = {(batch, length, k, r + 2 * n)}", x_dbl)
    for name, t in (("dt_bias", dt_bias), ("D", D)):
        if tuple(t.shape) != (k, dim):
            raise _shape_error(name, f"(K, d) = {(k, dim)}", t)
    if tuple(idx.shape) != (k, length) or idx.dtype != torch.int64:
        raise ValueError(
            f"csm_scan: idx must be int64 (K, L) = {(k, length)}, got {idx.dtype} {tuple(idx.shape)}"
        )
