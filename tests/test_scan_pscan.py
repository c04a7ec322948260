"""The chunked `pscan` backend (vmddpm/ops/scan_pscan.py): equal to `ref` across chunk boundaries, its
memory bound (what the forward keeps), autocast, and fp16/bf16 inputs on mamba-ssm's own test matrix."""

from __future__ import annotations

import pytest
import torch

from vmddpm.ops import scan_pscan
from vmddpm.ops.selective_scan import available_backends, selective_scan

FAST = [b for b in ("pscan", "cpu") if b in available_backends("cpu")]
ALL_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(batch, dim, length, n, *, bc=("var", "var"), dtype=torch.float64, seed=0):
    """Random inputs; bc gives B's and C's form: 'var' (batch, N, L), an int g (batch, g, N, L), or
    'const' (dim, N)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    def bc_shape(form):
        if form == "const":
            return (dim, n)
        return (batch, n, length) if form == "var" else (batch, form, n, length)

    return {
        "u": r(batch, dim, length),
        "delta": (torch.rand(batch, dim, length, generator=g, dtype=dtype) * 0.5).requires_grad_(),
        "A": (-torch.rand(dim, n, generator=g, dtype=dtype) - 0.1).requires_grad_(),
        "B": r(*bc_shape(bc[0])),
        "C": r(*bc_shape(bc[1])),
        "D": r(dim),
        "z": r(batch, dim, length),
        "delta_bias": r(dim, scale=0.1),
    }


def _grads(backend, x, keys, *, use_out=True, use_last=True, **kw):
    """Outputs and the gradient of every input in `keys` of a random linear function of (out, last)."""
    args = {k: v for k, v in x.items() if k in keys}
    y, last = selective_scan(backend=backend, **args, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(99)
    loss = 0
    if use_out:
        loss = loss + (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    if use_last:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=last.dtype)).sum()
    wrt = [args[k] for k in keys if args[k].requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(wrt, grads, strict=True)]
    return y, last, grads


def _assert_equal_to_ref(x, keys, chunk, monkeypatch, **kw):
    monkeypatch.setattr(scan_pscan, "PSCAN_CHUNK", chunk)
    y_ref, last_ref, g_ref = _grads("ref", x, keys, **kw)
    y, last, g = _grads("pscan", x, keys, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-9, atol=1e-10)
    names = [k for k in keys if x[k].requires_grad]
    for name, a, b in zip(names, g, g_ref, strict=True):
        torch.testing.assert_close(
            a, b, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"grad of {name}: {m}"
        )


# ------------------------------------------------------------------------------ chunk boundaries
@pytest.mark.parametrize("chunk", [4, 5])
@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 8, 10, 17])
def test_every_gradient_equals_ref_across_chunk_boundaries(chunk, length, monkeypatch) -> None:
    """Lengths below, at, just past and at multiples of the chunk (a boundary exactly at L), every
    option on, float64: outputs, last state and the gradient of every input equal `ref`."""
    x = _inputs(2, 4, length, 3, bc=(2, "var"), seed=length)
    _assert_equal_to_ref(x, ALL_KEYS, chunk, monkeypatch, delta_softplus=True)


@pytest.mark.parametrize(
    "bc", [("var", "var"), (2, 2), (2, 3), ("const", "var"), ("var", "const"), ("const", "const")]
)
@pytest.mark.parametrize("optional", [(), ("D", "z", "delta_bias")], ids=["plain", "D-z-bias"])
def test_b_c_forms_across_chunks(bc, optional, monkeypatch) -> None:
    """Every B/C form (shared, grouped, different group counts whose layout is their lcm, constant)."""
    x = _inputs(2, 6, 23, 4, bc=bc, seed=3)
    keys = ("u", "delta", "A", "B", "C", *optional)
    _assert_equal_to_ref(x, keys, 8, monkeypatch, delta_softplus=bool(optional))


@pytest.mark.parametrize(("use_out", "use_last"), [(True, False), (False, True)])
def test_gradient_through_only_one_output(use_out, use_last, monkeypatch) -> None:
    """The backward with no gradient for the output (only the last state is used) or none for the
    last state (the usual case)."""
    x = _inputs(2, 3, 13, 4, seed=4)
    _assert_equal_to_ref(x, ALL_KEYS, 4, monkeypatch, use_out=use_out, use_last=use_last)


def test_inputs_that_need_no_gradient(monkeypatch) -> None:
    """A, B, D and delta_bias frozen (no gradient buffers for them): the others are unchanged."""
    x = _inputs(2, 4, 11, 3, seed=6)
    for k in ("A", "D", "delta_bias", "B"):
        x[k] = x[k].detach()
    _assert_equal_to_ref(x, ALL_KEYS, 4, monkeypatch, delta_softplus=True)


def test_strong_decay_over_many_chunks(monkeypatch) -> None:
    """Decays down to e^-400 over 300 steps in chunks of 16: finite and equal to `ref`."""
    x = _inputs(1, 2, 300, 3, seed=2)
    with torch.no_grad():
        x["delta"].mul_(40.0)
        x["A"].mul_(20.0)
    _assert_equal_to_ref(x, ("u", "delta", "A", "B", "C"), 16, monkeypatch)


def test_non_contiguous_inputs(monkeypatch) -> None:
    """Inputs that are views with other strides (as a layout change upstream leaves them)."""
    x = _inputs(2, 4, 19, 3, bc=(2, "var"), seed=9)

    def strided(t):  # same values, stored transposed
        return t.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_()

    x = {k: strided(v) if v.dim() >= 3 else v for k, v in x.items()}
    assert not x["u"].is_contiguous() and not x["B"].is_contiguous()
    _assert_equal_to_ref(x, ALL_KEYS, 5, monkeypatch, delta_softplus=True)


# -------------------------------------------------------------------------------- memory bound
def test_forward_keeps_only_its_inputs_and_the_chunk_start_states(monkeypatch) -> None:
    """What autograd keeps between forward and backward: the inputs themselves (no copies or casts)
    and one (batch, dim, N) state per chunk; nothing of size L * N."""
    monkeypatch.setattr(scan_pscan, "PSCAN_CHUNK", 16)
    batch, dim, length, n = 2, 8, 100, 4
    x = _inputs(batch, dim, length, n, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan(**x, delta_softplus=True, backend="pscan")
    inputs = {t.data_ptr() for t in x.values()}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    n_chunks = -(-length // 16)
    assert sum(t.numel() for t in extra) == n_chunks * batch * dim * n, [tuple(t.shape) for t in extra]
    y.sum().backward()
    assert all(t.grad is not None for t in x.values())


def test_default_chunk_per_device() -> None:
    """PSCAN_CHUNK on CPU (measured there); PSCAN_CHUNK_ACCEL on devices where every op is a launch."""
    assert scan_pscan.default_chunk(torch.device("cpu")) == scan_pscan.PSCAN_CHUNK
    assert scan_pscan.default_chunk(torch.device("cuda")) == scan_pscan.PSCAN_CHUNK_ACCEL
    assert scan_pscan.PSCAN_CHUNK_ACCEL >= scan_pscan.PSCAN_CHUNK


# ------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("backend", ["ref", *FAST])
def test_autocast_does_not_reach_inside_the_scan(backend) -> None:
    """Under torch.autocast (bf16 on CPU), the scan still runs in float32: outputs equal the run
    without autocast (before: the C contraction and einsums ran in bf16, ~4e-3 off); the backward,
    outside autocast as vmddpm.train runs it (and, for pscan, also inside), too."""
    x = _inputs(2, 8, 70, 4, dtype=torch.float32, seed=8)
    kw = {"delta_softplus": True, "return_last_state": True}

    def run(autocast: bool, backward_inside: bool):
        xs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, last = selective_scan(**xs, backend=backend, **kw)
            if backward_inside:
                (y.sum() + last.sum()).backward()
        if not backward_inside:
            (y.sum() + last.sum()).backward()
        return y, last, [xs[k].grad for k in ALL_KEYS]

    y0, last0, g0 = run(False, False)
    cases = [(True, False)] + ([(True, True)] if backend == "pscan" else [])
    for autocast, inside in cases:
        y, last, g = run(autocast, inside)
        assert y.dtype == torch.float32 and last.dtype == torch.float32
        torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(last, last0, rtol=1e-6, atol=1e-6)
        for name, a, b in zip(ALL_KEYS, g, g0, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------- mamba-ssm's mixed-precision test
def _mamba_tolerances(itype):
    """tests/ops/test_selective_scan.py of state-spaces/mamba: rtol/atol per input dtype; the weights'
    (A, D, delta_bias, z and constant B/C) rtolw/atolw, raised to rtol/atol when there is a z gate."""
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-3, 5e-3)
    if itype == torch.bfloat16:
        rtol, atol = 3e-2, 5e-2
    rtolw, atolw = max(1e-3, rtol), max(1e-3, atol)  # has_z
    return rtol, atol, rtolw, atolw


@pytest.mark.parametrize("itype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("seqlen", "groups", "variable"),
    [
        *((L, g, True) for L in (128, 256, 512, 1024, 2048, 4096) for g in (1, 2)),
        (372, 1, False),
        (1134, 1, True),
    ],
)
def test_mixed_precision_meets_mamba_tolerances(itype, seqlen, groups, variable) -> None:
    """mamba-ssm's test_selective_scan on CPU: batch 2, dim 4, dstate 8, A = -0.5 rand (fp32), B/C
    randn in itype (variable, 1 or 2 groups) or fp32 (dim, N) constants, D randn and delta_bias 0.5 rand
    (fp32), u, z randn and delta 0.5 rand in itype, delta_softplus and return_last_state; the output, the
    last state and every gradient (of g = randn_like(out)) compared with its allclose tolerances.

    mamba compares its CUDA kernel with `selective_scan_ref` fed the same rounded inputs; here the
    reference is `ref` on float32 copies of them (the same float32 computation, except that mamba's ref
    computes silu(z) in z's dtype, which is less precise than its kernel and costs bf16 runs a few
    tenths of a percent in dA), its gradients rounded to each input's dtype as autograd does for
    mamba's ref. seqlen: mamba's list (128 ... 4096, groups 1 and 2), plus 372 with constant (dim, N)
    B and C (its is_variable_B/C = False) and 1134, both from its longer commented-out list: with the
    default `PSCAN_CHUNK` (128), mamba's lengths end exactly at a chunk boundary, 372 and 1134 inside
    a partial chunk."""
    rtol, atol, rtolw, atolw = _mamba_tolerances(itype)
    g = torch.Generator().manual_seed(0)
    batch, dim, dstate = 2, 4, 8

    def randn(*shape, dtype=itype):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    def rand(*shape, dtype=itype):
        return (0.5 * torch.rand(*shape, generator=g)).to(dtype).requires_grad_()

    bc = (batch, dstate, seqlen) if groups == 1 else (batch, groups, dstate, seqlen)
    x = {
        "A": (-rand(dim, dstate, dtype=torch.float32)).detach().requires_grad_(),
        "B": randn(*bc) if variable else randn(dim, dstate, dtype=torch.float32),
        "C": randn(*bc) if variable else randn(dim, dstate, dtype=torch.float32),
        "D": randn(dim, dtype=torch.float32),
        "z": randn(batch, dim, seqlen),
        "delta_bias": rand(dim, dtype=torch.float32),
        "u": randn(batch, dim, seqlen),
        "delta": rand(batch, dim, seqlen),
    }
    kw = {"delta_softplus": True, "return_last_state": True}
    x32 = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    out_ref, state_ref = selective_scan(**x32, backend="ref", **kw)
    dout = torch.randn(out_ref.shape, generator=g).to(itype)
    out_ref.backward(dout.float())
    tol = {
        "u": (rtol * 2, atol * 2),
        "delta": (rtol * 5, atol * 10),
        "A": (rtolw, atolw * 5),
        "B": (rtol, atol) if variable else (rtolw, atolw),
        "C": (rtol, atol) if variable else (rtolw, atolw),
        "D": (rtolw, atolw),
        "z": (rtolw, atolw),
        "delta_bias": (rtolw, atolw),
    }
    for backend in FAST:
        xb = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        out, state = selective_scan(**xb, backend=backend, **kw)
        assert out.dtype == itype and state.dtype == torch.float32
        out.backward(dout)
        failed = []
        checks = [("out", out, out_ref.to(itype), rtol, atol), ("state", state, state_ref, rtol, atol)]
        checks += [(k, xb[k].grad, x32[k].grad.to(x[k].dtype), *tol[k]) for k in ALL_KEYS]
        for name, a, b, rt, at in checks:
            assert a.dtype == b.dtype, (backend, name, a.dtype, b.dtype)
            if not torch.allclose(a, b, rtol=rt, atol=at):
                worst = float(((a - b).abs() - rt * b.abs()).max())
                failed.append(f"{name} (max |diff| {float((a - b).abs().max()):.3g}, excess {worst:.3g})")
        assert not failed, f"{backend}: " + ", ".join(failed)
