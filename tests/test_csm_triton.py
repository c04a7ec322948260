"""The Triton kernels of `vmddpm.ops.csm_triton` equal the CSM op's definition
(`csm_scan_gathered(..., backend="ref")`) in outputs and in the gradient of every input.

Without a GPU they run under Triton's interpreter, which triton reads when the kernels are
decorated: `test_kernels_under_interpreter` runs this file again in a subprocess with
TRITON_INTERPRET=1 (so the variable never reaches another test module's process), where the
`interp` tests run on CPU tensors in float64 (and in bf16/fp16 against mamba-ssm's tolerances).
`TRITON_INTERPRET=1 pytest tests/test_csm_triton.py` runs them directly. The `gpu` tests run the
same comparisons compiled on CUDA (`pytest -m gpu`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from vmddpm.nn.scan2d import SR_MODES, scan_indices
from vmddpm.ops import csm_triton as ct
from vmddpm.ops.cross_scan import csm_scan_gathered
from vmddpm.ops.selective_scan import selective_scan_ref

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
NAMES = ("u", "x_dbl", "dt_weight", "dt_bias", "A", "D")
# mamba-ssm tests/ops/test_selective_scan.py: output (rtol, atol) per input dtype
MAMBA_TOL = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}

interp = pytest.mark.skipif(
    not INTERP, reason="runs in test_kernels_under_interpreter's TRITON_INTERPRET=1 subprocess"
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERP, reason="needs CUDA (compiled Triton)")


# ----------------------------------------------------------------------------- interpreter harness
def test_kernels_under_interpreter() -> None:
    """Run this file's interpreter tests in a child process with TRITON_INTERPRET=1."""
    if INTERP:
        pytest.skip("already inside the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    tail = (proc.stdout[-8000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"interpreter run failed ({time.time() - t0:.0f} s):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def _sliced_generic_scan(self, input):
    """Triton's interpreter runs a custom-combine associative_scan one element at a time (a Python
    call per element); the combine functions here are element-wise, so calling them on whole slices
    along the scan axis is the same arithmetic, ~10x faster. Checked against the original below."""
    dtypes = [a.dtype for a in input]
    data = [np.moveaxis(a.handle.data, self.axis, 0) for a in input]
    out = [np.empty_like(d) for d in data]
    acc = [d[0] for d in data]
    for o, a in zip(out, acc, strict=True):
        o[0] = a
    for t in range(1, data[0].shape[0]):
        args = [self.to_tensor(np.ascontiguousarray(a), dt) for a, dt in zip(acc, dtypes, strict=True)]
        args += [self.to_tensor(np.ascontiguousarray(d[t]), dt) for d, dt in zip(data, dtypes, strict=True)]
        res = self.combine_fn.fn(*args)
        acc = [r.handle.data for r in (res if isinstance(res, tuple) else (res,))]
        for o, a in zip(out, acc, strict=True):
            o[t] = a
    return [self.to_tensor(np.moveaxis(o, 0, self.axis), dt) for o, dt in zip(out, dtypes, strict=True)]


@pytest.fixture(scope="module", autouse=True)
def _fast_interpreter_scan():
    if not INTERP:
        yield
        return
    from triton.runtime import interpreter

    original = interpreter.ScanOps.generic_scan
    interpreter.ScanOps.generic_scan = _sliced_generic_scan
    yield original
    interpreter.ScanOps.generic_scan = original


# --------------------------------------------------------------------------------------- helpers
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


# ------------------------------------------------------------------------------- interpreter tests
@interp
def test_fast_interpreter_scan_equals_the_interpreters_own(_fast_interpreter_scan) -> None:
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    original = _fast_interpreter_scan

    @triton.jit
    def kern(a_ptr, b_ptr, o_ptr, REV: tl.constexpr):
        i = tl.arange(0, 8)[:, None, None] * 8 + tl.arange(0, 4)[None, :, None] * 2
        i = i + tl.arange(0, 2)[None, None, :]
        aa, bb = tl.associative_scan((tl.load(a_ptr + i), tl.load(b_ptr + i)), 0, ct._affine, reverse=REV)
        tl.store(o_ptr + i, bb + aa)

    a, b = torch.rand(8, 4, 2, dtype=torch.float64), torch.randn(8, 4, 2, dtype=torch.float64)
    for rev in (False, True):
        fast, slow = torch.zeros_like(a), torch.zeros_like(a)
        kern[(1,)](a, b, fast, REV=rev)
        interpreter.ScanOps.generic_scan = original
        try:
            kern[(1,)](a, b, slow, REV=rev)
        finally:
            interpreter.ScanOps.generic_scan = _sliced_generic_scan
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)


@interp
@pytest.mark.parametrize("mode", SR_MODES)
def test_cross_scan_and_merge_tokens(mode) -> None:
    """Scan = the gather, merge = gather back and sum, each the other's adjoint (exact)."""
    b, h, w, d = 2, 5, 7, 20
    idx, inv = scan_indices(h, w, mode, 2, 3)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(b, h * w, d, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(b, 4 * d, h * w, generator=g, dtype=torch.float64, requires_grad=True)
    xs = ct.cross_scan_tokens(u, idx)
    xs_ref = u.transpose(1, 2)[:, :, idx].transpose(1, 2).reshape(b, 4 * d, h * w)
    assert xs.is_contiguous() and xs.dtype == u.dtype
    torch.testing.assert_close(xs, xs_ref, rtol=0, atol=0)
    merged = ct.cross_merge_tokens(ys, idx, inv)
    yk = ys.view(b, 4, d, h * w)
    merged_ref = torch.gather(yk, 3, inv[None, :, None, :].expand(b, 4, d, h * w)).sum(1).transpose(1, 2)
    torch.testing.assert_close(merged, merged_ref, rtol=1e-15, atol=1e-14)
    # adjoint: <scan(u), ys> = <u, merge(ys)>, and autograd runs the other kernel
    torch.testing.assert_close((xs * ys).sum(), (u * merged).sum(), rtol=1e-12, atol=0)
    gu, gys = torch.autograd.grad((xs * ys).sum() + (merged * u).sum(), (u, ys))
    torch.testing.assert_close(
        gu, merged_ref + ct.cross_merge_tokens(ys.detach(), idx), rtol=1e-14, atol=1e-14
    )
    torch.testing.assert_close(gys, 2 * xs_ref.detach(), rtol=0, atol=0)
    # half precision: the merge sums in fp32 and rounds once (fp16: exactly as torch does; the
    # interpreter truncates fp32 -> bf16 instead of rounding to nearest even: within one bf16 ulp)
    for half, rtol in ((torch.float16, 0.0), (torch.bfloat16, 2.0**-7)):
        yh = ys.detach().to(half)
        mh = ct.cross_merge_tokens(yh, idx)
        assert mh.dtype == half
        mh_ref = torch.gather(yh.float().view(b, 4, d, -1), 3, inv[None, :, None, :].expand(b, 4, d, h * w))
        mh_ref = mh_ref.sum(1).transpose(1, 2)
        torch.testing.assert_close(mh.float(), mh_ref.to(half).float(), rtol=rtol, atol=0)


@interp
def test_gather_x_dbl_and_its_gradients() -> None:
    b, h, w, d, n, r = 2, 5, 7, 20, 4, 3
    idx, _ = scan_indices(h, w, "window", 2, 0)
    _, x, wt, *_ = _inputs(b, h, w, d, n, r, seed=2)
    delta, bs, cs = ct.gather_x_dbl(x, wt, idx)
    xd = torch.gather(x.permute(0, 2, 3, 1), 3, idx[None, :, None, :].expand(b, 4, r + 2 * n, h * w))
    delta_ref = torch.einsum("bkrl,kdr->bkdl", xd[:, :, :r], wt).reshape(b, 4 * d, h * w)
    outs, refs = (delta, bs, cs), (delta_ref, xd[:, :, r : r + n], xd[:, :, r + n :])
    for o, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, ref, rtol=1e-14, atol=1e-14)
    gs = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, (x, wt), gs)
    want = torch.autograd.grad(refs, (x, wt), gs)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


@interp
@pytest.mark.parametrize("mode", SR_MODES)
def test_csm_scan_mamba_path_equals_ref(mode) -> None:
    c = _window_case(mode)
    idx, _ = scan_indices(c["h"], c["w"], mode, c["window"], 7)
    xs = _inputs(c["b"], c["h"], c["w"], c["d"], c["n"], c["r"], seed=3)
    gy = torch.randn(c["b"], c["h"] * c["w"], c["d"], dtype=torch.float64)
    y_ref, g_ref = _reference(xs, idx, gy)
    y, g = _run(lambda *a: ct.csm_scan_mamba(*a, idx, selective_scan_ref), xs, gy)
    _assert_all_close(y, g, y_ref, g_ref, rtol=1e-10, atol=1e-11)


@interp
@pytest.mark.parametrize("mode", SR_MODES)
def test_csm_scan_triton_equals_ref(mode) -> None:
    c = _window_case(mode)
    idx, _ = scan_indices(c["h"], c["w"], mode, c["window"], 7)
    xs = _inputs(c["b"], c["h"], c["w"], c["d"], c["n"], c["r"], seed=4)
    gy = torch.randn(c["b"], c["h"] * c["w"], c["d"], dtype=torch.float64)
    y_ref, g_ref = _reference(xs, idx, gy)
    y, g = _run(lambda *a: ct.csm_scan_triton(*a, idx, tile=16, chunk=32), xs, gy)
    assert y.dtype == torch.float64
    _assert_all_close(y, g, y_ref, g_ref, rtol=1e-10, atol=1e-11)


@interp
@pytest.mark.parametrize(
    ("b", "h", "w", "d", "n", "r", "window", "chunk"),
    [
        (1, 3, 6, 16, 3, 1, 4, 16),  # one checkpoint per tile, window larger than the map, N = 3
        (1, 4, 9, 33, 2, 17, 3, 48),  # three channel blocks (one of 1), R > 16, chunk of 3 tiles
    ],
)
def test_csm_scan_triton_other_shapes(b, h, w, d, n, r, window, chunk) -> None:
    idx, _ = scan_indices(h, w, "window", window, 0)
    xs = _inputs(b, h, w, d, n, r, seed=5)
    gy = torch.randn(b, h * w, d, dtype=torch.float64)
    y_ref, g_ref = _reference(xs, idx, gy)
    y, g = _run(lambda *a: ct.csm_scan_triton(*a, idx, tile=16, chunk=chunk), xs, gy)
    _assert_all_close(y, g, y_ref, g_ref, rtol=1e-10, atol=1e-11)


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


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["triton", "mamba"])
def test_half_precision_meets_mamba_tolerances(path, dtype) -> None:
    _low_precision_case(path, dtype)


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


# ------------------------------------------------------------------------------------- GPU tests
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
