"""The Triton CSM kernels under Triton's interpreter, on CPU tensors: every kernel equals the op's
definition (`csm_scan_gathered(..., backend="ref")`) in outputs and in the gradient of every input.

Triton reads TRITON_INTERPRET when the kernels are decorated, so this file runs only in a process
started with it: `tests/test_csm_triton.py::test_kernels_under_interpreter` starts one (the
variable never reaches another test module's process); by hand:
`TRITON_INTERPRET=1 pytest tests/interp_csm_triton.py`. Not a `test_*.py` file, so a plain `pytest`
run does not collect it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (see its docstring)")

from tests.csm_triton_common import (
    _assert_all_close,
    _inputs,
    _low_precision_case,
    _reference,
    _run,
    _window_case,
)
from vmddpm.nn.scan2d import SR_MODES, scan_indices
from vmddpm.ops import csm_triton as ct
from vmddpm.ops.selective_scan import selective_scan_ref


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
    from triton.runtime import interpreter

    original = interpreter.ScanOps.generic_scan
    interpreter.ScanOps.generic_scan = _sliced_generic_scan
    yield original
    interpreter.ScanOps.generic_scan = original


# ------------------------------------------------------------------------------- interpreter tests
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


@pytest.mark.parametrize("mode", SR_MODES)
def test_csm_scan_mamba_path_equals_ref(mode) -> None:
    c = _window_case(mode)
    idx, _ = scan_indices(c["h"], c["w"], mode, c["window"], 7)
    xs = _inputs(c["b"], c["h"], c["w"], c["d"], c["n"], c["r"], seed=3)
    gy = torch.randn(c["b"], c["h"] * c["w"], c["d"], dtype=torch.float64)
    y_ref, g_ref = _reference(xs, idx, gy)
    y, g = _run(lambda *a: ct.csm_scan_mamba(*a, idx, selective_scan_ref), xs, gy)
    _assert_all_close(y, g, y_ref, g_ref, rtol=1e-10, atol=1e-11)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["triton", "mamba"])
def test_half_precision_meets_mamba_tolerances(path, dtype) -> None:
    _low_precision_case(path, dtype)
