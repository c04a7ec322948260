"""Every S6 backend equals the sequential reference, in outputs and in the gradient of every input."""

from __future__ import annotations

import pytest
import torch

from vmddpm.ops.selective_scan import available_backends, resolve_backend, selective_scan

FAST = [b for b in ("pscan", "cpu") if b in available_backends("cpu")]


def _inputs(batch, dim, length, n, *, groups=0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    bc = (batch, groups, n, length) if groups else (batch, n, length)
    return {
        "u": r(batch, dim, length),
        "delta": (torch.rand(batch, dim, length, generator=g, dtype=dtype) * 0.5).requires_grad_(),
        "A": (-torch.rand(dim, n, generator=g, dtype=dtype) - 0.1).requires_grad_(),
        "B": r(*bc),
        "C": r(*bc),
        "D": r(dim),
        "z": r(batch, dim, length),
        "delta_bias": r(dim, scale=0.1),
    }


def _run(backend, x, keys, **kw):
    args = {k: v for k, v in x.items() if k in keys}
    out = selective_scan(backend=backend, **args, **kw)
    y, last = out if kw.get("return_last_state") else (out, None)
    loss = y.sum() + (last.sum() if last is not None else 0)
    # allow_unused: with L = 1 and a zero initial state, A does not reach the output at all
    grads = torch.autograd.grad(loss, [args[k] for k in keys], allow_unused=True)
    grads = tuple(torch.zeros_like(args[k]) if gr is None else gr for k, gr in zip(keys, grads, strict=True))
    return y, last, grads


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("length", [1, 7, 33, 100])
@pytest.mark.parametrize(
    "optional",
    [(), ("D",), ("z",), ("D", "z", "delta_bias")],
    ids=["plain", "D", "z", "D-z-bias"],
)
def test_backend_equals_ref_outputs_and_gradients(backend, length, optional) -> None:
    x = _inputs(2, 3, length, 4, seed=length)
    keys = ("u", "delta", "A", "B", "C", *optional)
    softplus = "delta_bias" in optional
    y_ref, _, g_ref = _run("ref", x, keys, delta_softplus=softplus)
    y, _, g = _run(backend, x, keys, delta_softplus=softplus)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for name, a, b in zip(keys, g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", FAST)
def test_grouped_bc_and_last_state(backend) -> None:
    x = _inputs(2, 4, 19, 3, groups=2, seed=5)
    keys = ("u", "delta", "A", "B", "C", "D")
    y_ref, last_ref, g_ref = _run("ref", x, keys, return_last_state=True)
    y, last, g = _run(backend, x, keys, return_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backend", FAST)
def test_float32_close_to_float64_reference(backend) -> None:
    x64 = _inputs(2, 5, 64, 8, seed=3)
    x32 = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
    keys = ("u", "delta", "A", "B", "C", "D", "z")
    y_ref, _, _ = _run("ref", x64, keys)
    y, _, _ = _run(backend, x32, keys)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_auto_resolution_on_cpu() -> None:
    expected = "cpu" if "cpu" in available_backends("cpu") else "pscan"
    assert resolve_backend("auto", "cpu") == expected


def test_unavailable_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cuda"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", "cpu")


def test_bad_shapes_name_the_expected_shape() -> None:
    x = _inputs(2, 3, 10, 4)
    with pytest.raises(ValueError, match=r"\(batch, dim, L\)"):
        selective_scan(x["u"][0], x["delta"][0], x["A"], x["B"], x["C"], backend="ref")


@pytest.mark.gpu
def test_cuda_equals_ref() -> None:
    if not torch.cuda.is_available() or "cuda" not in available_backends("cuda"):
        pytest.skip("needs CUDA and mamba-ssm (pip install .[cuda])")
    x = _inputs(2, 8, 64, 16, dtype=torch.float32)
    xc = {k: v.detach().cuda().requires_grad_() for k, v in x.items()}
    keys = ("u", "delta", "A", "B", "C", "D", "z")
    y_ref, _, g_ref = _run("ref", xc, keys)
    y, _, g = _run("cuda", xc, keys)
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)
