"""The fused CSM op (`vmddpm.ops.cross_scan.csm_scan`): every CPU-runnable backend equals the
definition (gathered sequences through `selective_scan_ref`) in outputs and in the gradient of every
input, for every SR mode's index tables; the network built on it computes what the gathered
formulation computes; half-precision inputs meet mamba-ssm's own tolerances."""

from __future__ import annotations

import pytest
import torch

from vmddpm.nn.scan2d import SR_MODES, SS2D, scan_indices
from vmddpm.ops.cross_scan import (
    csm_scan,
    csm_scan_gathered,
    explain_csm_backend,
    resolve_csm_backend,
)
from vmddpm.ops.selective_scan import available_backends

FUSED = [b for b in ("cpu", "pscan") if b in available_backends("cpu")]
NAMES = ("u", "x_dbl", "dt_weight", "dt_bias", "A", "D")


def _inputs(batch, h, w, dim, n, r, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, length = 4, h * w

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    return {
        "u": rnd(batch, length, dim),
        "x_dbl": rnd(batch, length, k, r + 2 * n, scale=0.5),
        "dt_weight": rnd(k, dim, r, scale=0.5),
        "dt_bias": rnd(k, dim, scale=0.5),
        "A": (-torch.rand(k, dim, n, generator=g, dtype=dtype) * 2 - 0.1).requires_grad_(),
        "D": rnd(k, dim),
    }


def _run(fn, x, idx, **kw):
    y = fn(**x, idx=idx, **kw)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # every output matters
    grads = torch.autograd.grad((y * weights).sum(), [x[k] for k in NAMES])
    return y, grads


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", SR_MODES)
@pytest.mark.parametrize(
    ("batch", "h", "w", "dim", "n", "r", "window"),
    [(2, 5, 7, 3, 4, 2, 3), (1, 6, 4, 70, 3, 1, 4), (3, 3, 9, 17, 2, 3, 2)],
    ids=["5x7-win3", "6x4-d70", "3x9-d17"],
)
def test_backend_equals_definition_outputs_and_gradients(backend, mode, batch, h, w, dim, n, r, window):
    """float64, H != W, sizes not divisible by the SR window, channel counts across a block boundary."""
    x = _inputs(batch, h, w, dim, n, r, seed=h * 10 + w)
    idx, _ = scan_indices(h, w, mode, window, seed=1)
    y_ref, g_ref = _run(csm_scan_gathered, x, idx, backend="ref")
    y, g = _run(csm_scan, x, idx, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(NAMES, g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", FUSED)
def test_float32_close_to_float64_definition(backend):
    x64 = _inputs(2, 8, 8, 40, 16, 3, seed=4)
    x32 = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
    idx, _ = scan_indices(8, 8, "window", 4)
    y_ref, g_ref = _run(csm_scan_gathered, x64, idx, backend="ref")
    y, g = _run(csm_scan, x32, idx, backend=backend)
    assert y.dtype == torch.float32
    for name, a, b in [("y", y, y_ref), *zip(NAMES, g, g_ref, strict=True)]:
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    ("itype", "rtol", "atol"), [(torch.bfloat16, 3e-2, 5e-2), (torch.float16, 3e-3, 5e-3)]
)
def test_half_inputs_meet_mamba_tolerances(backend, itype, rtol, atol):
    """mamba-ssm's tests/ops/test_selective_scan.py compares its kernel on half inputs with the fp32
    reference of the same (rounded) inputs at these tolerances; the fused op keeps a float32 state and
    rounds once, at the output, so it must meet them too. Weights stay float32 (mamba's wtype)."""
    x = _inputs(2, 6, 10, 24, 16, 2, dtype=torch.float32, seed=9)
    half = {
        k: (v.detach().to(itype) if k in ("u", "x_dbl") else v.detach()).requires_grad_()
        for k, v in x.items()
    }
    ref_in = {k: v.detach().float().requires_grad_() for k, v in half.items()}
    idx, _ = scan_indices(6, 10, "zigzag", 4)
    y = csm_scan(**half, idx=idx, backend=backend)
    assert y.dtype == itype
    y_ref = csm_scan_gathered(**ref_in, idx=idx, backend="ref")
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    g = torch.autograd.grad(y, [half[k] for k in NAMES], gy.to(itype))
    g_ref = torch.autograd.grad(y_ref, [ref_in[k] for k in NAMES], gy.to(itype).float())
    for name, a, b in zip(NAMES, g, g_ref, strict=True):
        assert a.dtype == half[name].dtype, name
        tol = atol * max(1.0, float(b.abs().max()))  # mamba's atolw for weight gradients
        torch.testing.assert_close(a.float(), b, rtol=rtol * 5, atol=tol, msg=f"grad of {name}")


@pytest.mark.skipif("cpu" not in FUSED, reason="numba is not importable")
def test_ss2d_fused_equals_gathered_formulation_for_the_same_weights():
    """The CSM block on the fused kernel computes what VMamba's gather -> S6 -> merge formulation
    (the network before the fused op) computes, in fp32 to 1e-5, forward and every parameter grad."""
    torch.manual_seed(0)
    blocks = {}
    for backend in ("cpu", "ref"):
        torch.manual_seed(0)
        blocks[backend] = SS2D(
            24, d_state=8, expand=2, d_conv=3, dt_rank="auto", sr="window",
            sr_window=4, sr_seed=0, scan_backend=backend,
        )  # fmt: skip
    x = torch.randn(2, 24, 12, 10)
    outs = {}
    for backend, block in blocks.items():
        y = block(x)
        y.pow(2).sum().backward()
        outs[backend] = (y.detach(), block.layout.views(block.weights.grad))
    torch.testing.assert_close(outs["cpu"][0], outs["ref"][0], rtol=1e-5, atol=1e-5)
    for name, grad in outs["ref"][1].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(outs["cpu"][1][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_bad_shapes_name_the_input_and_expected_shape():
    x = {k: v.detach() for k, v in _inputs(2, 3, 4, 5, 2, 1).items()}
    idx, _ = scan_indices(3, 4, "none")
    with pytest.raises(ValueError, match=r"x_dbl must be \(batch, L, K, R \+ 2N\) = \(2, 12, 4, 5\)"):
        csm_scan(**{**x, "x_dbl": x["x_dbl"][..., :-1]}, idx=idx, backend="ref")
    with pytest.raises(ValueError, match=r"idx must be int64 \(K, L\)"):
        csm_scan(**x, idx=idx[:, :-1], backend="ref")


def test_auto_explains_its_choice_and_explicit_backends_fail_clearly():
    name, why = explain_csm_backend("auto", "cpu")
    assert name == resolve_csm_backend("auto", "cpu") == ("cpu" if "cpu" in FUSED else "pscan")
    assert why.startswith("auto on cpu")
    with pytest.raises(ValueError, match="'triton' cannot run: it runs on CUDA tensors only"):
        resolve_csm_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_csm_backend("numpy", "cpu")


@pytest.mark.skipif("cpu" not in FUSED, reason="numba is not importable")
def test_cpu_kernel_refuses_a_backward_after_an_input_changed_in_place():
    """The kernel reads the inputs' memory directly; autograd's version check still guards it."""
    x = _inputs(1, 4, 4, 4, 2, 1, dtype=torch.float32)
    u = x["u"].detach().clone().requires_grad_()
    v = u * 1.0
    y = csm_scan(**{**x, "u": v}, idx=scan_indices(4, 4, "none")[0], backend="cpu")
    with torch.no_grad():
        v.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
