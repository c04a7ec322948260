"""Shared inputs and comparisons of the Triton CSM tests (`tests/test_csm_triton.py` on CUDA and
`tests/interp_csm_triton.py` under Triton's interpreter)."""

from __future__ import annotations

import torch

from vmddpm.nn.scan2d import scan_indices
from vmddpm.ops import csm_triton as ct
from vmddpm.ops.cross_scan import csm_scan_gathered
from vmddpm.ops.selective_scan import selective_scan_ref

NAMES = ("u", "x_dbl", "dt_weight", "dt_bias", "A", "D")
# mamba-ssm tests/ops/test_selective_scan.py: output (rtol, atol) per input dtype
MAMBA_TOL = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


def _inputs(b, h, w, d, n, r, *, dtype=torch.float64, device="cpu", seed=0):
    """Random CSM inputs at the scales the model sees (dt ~ softplus(-1 +- 0.5), decays in (0, 1))."""
    g = torch.Generator().manual_seed(seed)
    length, k = h * w, 4
    ts = (
        torch.randn(b, length, d, generator=g, dtype=torch.float64),
        torch.randn(b, length, k, r + 2 * n, generator=g, dtype=torch.float64),
        torch.randn(k, d, r, generator=g, dtype=torch.float64) * r**-0.5,
        torch.randn(k, d, generator=g, dtype=torch.float64) * 0.5 - 1.0,
        -torch.rand(k, d, n, generator=g, dtype=torch.float64) * 1.5 - 0.1,
        torch.randn(k, d, generator=g, dtype=torch.float64),
    )
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in ts]


def _run(fn, xs, gy):
    y = fn(*xs)
    return y, torch.autograd.grad(y, xs, gy)


def _assert_all_close(y, g, y_ref, g_ref, rtol, atol):
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol * scale, msg=lambda m: f"output: {m}")
    for name, a, b in zip(NAMES, g, g_ref, strict=True):
        s = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * s, msg=lambda m, n=name: f"grad {n}: {m}")


def _reference(xs, idx, gy, dtype=None):
    """csm_scan_gathered(ref) on copies of xs (in `dtype` when given) with upstream gradient gy."""
    xr = [x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]
    return _run(lambda *a: csm_scan_gathered(*a, idx, backend="ref"), xr, gy.to(dtype or gy.dtype))


def _window_case(mode):
    """H != W, neither divisible by the SR window 2; L = 35 is not a multiple of the tile (16) or
    the chunk (32); d = 20 is not a multiple of the channel block (16)."""
    return dict(b=2, h=5, w=7, d=20, n=4, r=3, window=2)


def _low_precision_case(path, dtype):
    """Half-precision u and x_dbl (float32 parameters, as under autocast) against the float32
    reference of the same rounded inputs: outputs within mamba-ssm's own tolerances, gradients
    within a relative norm error (mamba's test does not bound those)."""
    b, h, w, d, n, r = 2, 5, 7, 20, 4, 3
    idx, _ = scan_indices(h, w, "zigzag", 2, 0)
    xs = _inputs(b, h, w, d, n, r, dtype=torch.float32, seed=6)
    xs = [x.detach().to(dtype).requires_grad_() if i < 2 else x for i, x in enumerate(xs)]
    gy = torch.randn(b, h * w, d).to(dtype)
    fn = {
        "triton": lambda *a: ct.csm_scan_triton(*a, idx, tile=16, chunk=32),
        "mamba": lambda *a: ct.csm_scan_mamba(*a, idx, selective_scan_ref),
    }[path]
    y, g = _run(fn, xs, gy)
    assert y.dtype == dtype and g[0].dtype == dtype and g[1].dtype == dtype
    assert all(gi.dtype == torch.float32 for gi in g[2:])
    y_ref, g_ref = _reference(xs, idx, gy, dtype=torch.float32)
    rtol, atol = MAMBA_TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol)
    bound = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for name, a, ref in zip(NAMES, g, g_ref, strict=True):
        err = ((a.float() - ref).norm() / ref.norm()).item()
        assert err < bound, f"grad {name}: relative error {err:.2e} >= {bound}"


def _gpu_case(mode, dtype=torch.float32):
    b, h, w, d, n, r = 2, 12, 20, 40, 16, 3
    idx, _ = scan_indices(h, w, mode, 3, 7)
    xs = _inputs(b, h, w, d, n, r, dtype=dtype, device="cuda", seed=8)
    gy = torch.randn(b, h * w, d, device="cuda", dtype=dtype)
    return idx.cuda(), xs, gy


def _mamba_fns():
    fns = {"ref": selective_scan_ref}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        fns["mamba_ssm"] = selective_scan_fn
    except Exception:  # not installed, or its CUDA extension does not load
        pass
    return fns
