"""The Triton kernels of `vmddpm.ops.csm_triton` equal the CSM op's definition
(`csm_scan_gathered(..., backend="ref")`) in outputs and in the gradient of every input.

Without a GPU they run under Triton's interpreter, which triton reads when the kernels are
decorated: `test_kernels_under_interpreter` runs `tests/interp_csm_triton.py` in a subprocess with
TRITON_INTERPRET=1 (so the variable never reaches another test module's process), on CPU tensors in
float64 (and in bf16/fp16 against mamba-ssm's tolerances). The `gpu` tests run the same comparisons
compiled on CUDA (`pytest -m gpu`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tests.csm_triton_common import (
    MAMBA_TOL,
    _assert_all_close,
    _gpu_case,
    _inputs,
    _mamba_fns,
    _reference,
    _run,
)
from vmddpm.nn.scan2d import SR_MODES, scan_indices
from vmddpm.ops import csm_triton as ct
from vmddpm.ops.cross_scan import csm_scan_gathered
from vmddpm.ops.selective_scan import selective_scan_ref

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (compiled Triton)")
CASES = Path(__file__).with_name("interp_csm_triton.py")


def test_kernels_under_interpreter() -> None:
    """Run tests/interp_csm_triton.py in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=CASES.parents[1])
    tail = (proc.stdout[-8000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"interpreter run failed ({time.time() - t0:.0f} s):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout and "skipped" not in proc.stdout, tail


def test_bad_blocks_and_shapes_are_clear_errors() -> None:
    xs = [x.detach() for x in _inputs(1, 2, 3, 4, 2, 1)]
    idx, _ = scan_indices(2, 3, "none")
    with pytest.raises(ValueError, match="tile"):
        ct.csm_scan_triton(*xs, idx, tile=8)
    with pytest.raises(ValueError, match="chunk"):
        ct.csm_scan_triton(*xs, idx, tile=16, chunk=24)
    with pytest.raises(ValueError, match="x_dbl"):
        ct.csm_scan_triton(xs[0], xs[1][..., :-1], *xs[2:], idx)
    with pytest.raises(ValueError, match="idx"):
        ct.csm_scan_mamba(*xs, idx[:, :-1], selective_scan_ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", SR_MODES)
def test_gpu_tokens_kernels_exact(mode) -> None:
    idx, xs, _ = _gpu_case(mode)
    u, x, wt = xs[0], xs[1], xs[2]
    b, length, d = u.shape
    xs_ref = u.transpose(1, 2)[:, :, idx].transpose(1, 2).reshape(b, 4 * d, length)
    torch.testing.assert_close(ct.cross_scan_tokens(u, idx), xs_ref, rtol=0, atol=0)
    inv = ct._inverse(idx)
    yk = xs_ref.view(b, 4, d, length)
    merged_ref = torch.gather(yk, 3, inv[None, :, None, :].expand(b, 4, d, length)).sum(1).transpose(1, 2)
    torch.testing.assert_close(ct.cross_merge_tokens(xs_ref, idx), merged_ref, rtol=1e-6, atol=1e-5)
    # bf16: one rounding of the fp32 sum (round to nearest even, as torch)
    yb = xs_ref.to(torch.bfloat16)
    mb_ref = torch.gather(yb.float().view(b, 4, d, length), 3, inv[None, :, None, :].expand(b, 4, d, length))
    mb_ref = mb_ref.sum(1).transpose(1, 2).to(torch.bfloat16)
    torch.testing.assert_close(ct.cross_merge_tokens(yb, idx), mb_ref, rtol=0, atol=0)
    delta, bs, cs = ct.gather_x_dbl(x, wt, idx)
    r = wt.shape[2]
    xd = torch.gather(x.permute(0, 2, 3, 1), 3, idx[None, :, None, :].expand(b, 4, x.shape[3], length))
    torch.testing.assert_close(bs, xd[:, :, r : r + 16], rtol=0, atol=0)
    torch.testing.assert_close(cs, xd[:, :, r + 16 :], rtol=0, atol=0)
    delta_ref = torch.einsum("bkrl,kdr->bkdl", xd[:, :, :r].double(), wt.double()).reshape(b, 4 * d, -1)
    torch.testing.assert_close(delta.double(), delta_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", SR_MODES)
def test_gpu_csm_scan_triton_equals_ref(mode) -> None:
    idx, xs, gy = _gpu_case(mode)
    y_ref, g_ref = _reference(xs, idx, gy, dtype=torch.float64)
    y, g = _run(lambda *a: ct.csm_scan_triton(*a, idx), xs, gy)
    _assert_all_close(y.double(), [t.double() for t in g], y_ref, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["none", "random"])
def test_gpu_csm_scan_mamba_path_equals_ref(mode) -> None:
    idx, xs, gy = _gpu_case(mode)
    y_ref, g_ref = _reference(xs, idx, gy, dtype=torch.float64)
    for name, fn in _mamba_fns().items():
        y, g = _run(lambda *a, fn=fn: ct.csm_scan_mamba(*a, idx, fn), xs, gy)
        tol = (1e-4, 1e-5) if name == "ref" else (2e-3, 2e-3)
        _assert_all_close(y.double(), [t.double() for t in g], y_ref, g_ref, *tol)


@pytest.mark.gpu
@needs_cuda
def test_gpu_long_sequence_and_determinism() -> None:
    """L = 64 x 48 (many chunks), d = 96, N = 16 against the reference; the fused path's forward
    and backward give the same bits twice (no atomics anywhere)."""
    b, h, w, d, n, r = 2, 64, 48, 96, 16, 6
    idx, _ = scan_indices(h, w, "window", 5, 0)
    idx = idx.cuda()
    xs = _inputs(b, h, w, d, n, r, dtype=torch.float32, device="cuda", seed=9)
    gy = torch.randn(b, h * w, d, device="cuda")
    y_ref, g_ref = _reference(xs, idx, gy, dtype=torch.float64)
    runs = [_run(lambda *a: ct.csm_scan_triton(*a, idx), xs, gy) for _ in range(2)]
    _assert_all_close(runs[0][0].double(), [t.double() for t in runs[0][1]], y_ref, g_ref, 1e-4, 2e-5)
    assert torch.equal(runs[0][0], runs[1][0])
    for a, c in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, c)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", ["triton", "mamba"])
def test_gpu_bf16_autocast(path) -> None:
    """Under bf16 autocast the tokens and x_dbl come out of Linear layers in bf16: the op returns
    bf16 within mamba-ssm's bf16 tolerances of the fp32 reference on the same bf16 values, and
    (fused path, and the mamba path with mamba-ssm itself) no dtype conversion runs outside the
    kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b, h, w, d, n, r = 2, 16, 24, 64, 16, 4
    idx, _ = scan_indices(h, w, "zigzag", 4, 0)
    idx = idx.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(b, h * w, d, device="cuda", generator=g)
    lin_u = torch.nn.Linear(d, d, device="cuda")
    lin_x = torch.nn.Linear(d, 4 * (r + 2 * n), device="cuda")
    _, _, wt, bias, a, dd = _inputs(b, h, w, d, n, r, dtype=torch.float32, device="cuda", seed=10)
    fns = _mamba_fns()
    fn = {
        "triton": lambda *args: ct.csm_scan_triton(*args, idx),
        "mamba": lambda *args: ct.csm_scan_mamba(*args, idx, fns.get("mamba_ssm", selective_scan_ref)),
    }[path]

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "_to_copy" in name or "copy_" in name:
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    with torch.autocast("cuda", dtype=torch.bfloat16):
        u = lin_u(tokens)
        x = lin_x(tokens).view(b, h * w, 4, r + 2 * n)
        assert u.dtype == x.dtype == torch.bfloat16
        u_leaf, x_leaf = u.detach().requires_grad_(), x.detach().requires_grad_()
        check = path == "triton" or "mamba_ssm" in fns
        with Casts() as casts:
            y = fn(u_leaf, x_leaf, wt, bias, a, dd)
        if check:
            assert not casts.seen, f"dtype conversions outside the kernels: {casts.seen}"
    assert y.dtype == torch.bfloat16
    y_ref = csm_scan_gathered(u.float(), x.float(), wt, bias, a, dd, idx, backend="ref")
    rtol, atol = MAMBA_TOL[torch.bfloat16]
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol)
    y.float().square().sum().backward()
    assert u_leaf.grad.dtype == x_leaf.grad.dtype == torch.bfloat16
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (wt, bias, a, dd))
