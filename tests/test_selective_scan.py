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


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    ("batch", "dim", "length", "n", "groups"),
    [(1, 4, 1, 2, 2), (3, 6, 7, 3, 3), (2, 4, 33, 5, 1), (1, 8, 100, 4, 4)],
)
def test_softplus_z_grouped_last_state_random_shapes(backend, batch, dim, length, n, groups) -> None:
    """Every option at once (softplus without a bias too) on shapes that are not powers of two."""
    x = _inputs(batch, dim, length, n, groups=groups, seed=batch * 100 + length)
    for keys in (("u", "delta", "A", "B", "C", "z"), ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")):
        kw = {"delta_softplus": True, "return_last_state": True}
        y_ref, last_ref, g_ref = _run("ref", x, keys, **kw)
        y, last, g = _run(backend, x, keys, **kw)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(last, last_ref, rtol=1e-9, atol=1e-10)
        for name, a, b in zip(keys, g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", FAST)
def test_b_and_c_with_different_groups_and_constant_bc(backend) -> None:
    """B grouped, C shared (batch, N, L); and time-invariant B, C given as (dim, N)."""
    x = _inputs(2, 4, 9, 3, groups=2, seed=11)
    x["C"] = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    keys = ("u", "delta", "A", "B", "C", "D")
    y_ref, _, g_ref = _run("ref", x, keys)
    y, _, g = _run(backend, x, keys)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    x["B"] = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x["C"] = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y_ref, _, g_ref = _run("ref", x, keys)
    y, _, g = _run(backend, x, keys)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backend", FAST)
def test_float32_gradients_close_to_float64_reference(backend) -> None:
    """float32 in, float32 state: outputs and every gradient within ~1e-4 (relative to the largest
    entry) of the float64 reference, with softplus and grouped B/C."""
    x64 = _inputs(2, 6, 50, 4, groups=3, seed=7)
    x32 = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
    keys = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    y_ref, last_ref, g_ref = _run("ref", x64, keys, delta_softplus=True, return_last_state=True)
    y, last, g = _run(backend, x32, keys, delta_softplus=True, return_last_state=True)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    for name, a, b in [("y", y, y_ref), ("last", last, last_ref), *zip(keys, g, g_ref, strict=True)]:
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * scale, msg=f"{name}")


@pytest.mark.parametrize("backend", FAST)
def test_long_sequence_strong_decay_is_stable(backend) -> None:
    """Large dt * |A| (decays down to e^-400) over a long sequence: finite and equal to ref."""
    x = _inputs(1, 2, 300, 3, seed=2)
    with torch.no_grad():
        x["delta"].mul_(40.0)
        x["A"].mul_(20.0)
    keys = ("u", "delta", "A", "B", "C")
    y_ref, _, g_ref = _run("ref", x, keys)
    y, _, g = _run(backend, x, keys)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_auto_dispatch_matches_named_backend_on_cpu() -> None:
    x = _inputs(2, 3, 12, 4)
    keys = ("u", "delta", "A", "B", "C", "D")
    args = {k: x[k] for k in keys}
    auto = selective_scan(**args, backend="auto")
    named = selective_scan(**args, backend=resolve_backend("auto", "cpu"))
    torch.testing.assert_close(auto, named, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"delta": torch.zeros(2, 3, 9)}, r"delta must be \(batch, dim, L\)"),
        ({"A": torch.zeros(4, 4)}, r"A must be \(dim, N\) with dim = 3"),
        ({"B": torch.zeros(2, 5, 10)}, r"B must be \(batch, N, L\) = \(2, 4, 10\)"),
        ({"C": torch.zeros(2, 2, 4, 10)}, r"C must be"),  # 3 channels do not split into 2 groups
        ({"D": torch.zeros(4)}, r"D must be \(dim,\) = \(3,\)"),
        ({"z": torch.zeros(2, 3)}, r"z must be \(batch, dim, L\)"),
        ({"delta_bias": torch.zeros(3, 1)}, r"delta_bias must be \(dim,\)"),
    ],
)
def test_mismatched_shapes_name_input_and_expected_shape(change, pattern) -> None:
    x = {k: v.detach() for k, v in _inputs(2, 3, 10, 4, dtype=torch.float32).items()}
    x.update(change)
    with pytest.raises(ValueError, match=pattern):
        selective_scan(**x, backend="pscan")


def test_non_finite_inputs_rejected_in_debug_mode(monkeypatch) -> None:
    x = {k: v.detach().clone() for k, v in _inputs(2, 3, 10, 4).items()}
    x["B"][0, 1, 2] = float("nan")
    selective_scan(**x, backend="pscan")  # not checked by default (the check costs a sync on GPU)
    monkeypatch.setenv("VMDDPM_DEBUG", "1")
    with pytest.raises(ValueError, match="B has non-finite"):
        selective_scan(**x, backend="pscan")
    x["B"][0, 1, 2] = 0.0
    x["delta_bias"][1] = float("inf")
    with pytest.raises(ValueError, match="delta_bias has non-finite"):
        selective_scan(**x, backend="pscan")


def test_unknown_backend_in_selective_scan_names_it() -> None:
    x = {k: v.detach() for k, v in _inputs(1, 2, 5, 3).items()}
    with pytest.raises(ValueError, match=r"'numpy'.*unknown backend"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="numpy")


@pytest.mark.skipif("cpu" not in FAST, reason="numba is not importable")
def test_cpu_backend_keeps_the_thread_count_a_job_was_given() -> None:
    """A Snakemake job with threads: 1 runs with OMP_NUM_THREADS=1; starting numba's OpenMP pool
    must not widen torch's pool (or numba's) to every core behind the scheduler's back."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, numba\n"
        "from vmddpm.ops.selective_scan import selective_scan\n"
        "u = torch.randn(2, 4, 16, requires_grad=True)\n"
        "y = selective_scan(u, torch.rand(2, 4, 16), -torch.rand(4, 3), torch.randn(2, 3, 16),\n"
        "                   torch.randn(2, 3, 16), backend='cpu')\n"
        "y.sum().backward()\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"], out.stdout + out.stderr
