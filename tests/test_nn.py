"""The VM-DDPM network: cross-scan / Sequence Regeneration permutations, SS2D, SSLayer/MSSBlock, VMUNet."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.conftest import TINY
from vmddpm.errors import UserError
from vmddpm.nn.registry import build_model, count_parameters, model_signature
from vmddpm.nn.scan2d import (
    SR_MODES,
    SS2D,
    cross_merge,
    cross_scan,
    device_scan_index,
    scan_indices,
    sr_permutation,
)
from vmddpm.nn.vmunet import VMUNet
from vmddpm.ops.ss2d_cpu import fused_applicable
from vmddpm.ops.ss2d_layout import PARTS

VMUNET_PRESETS = (
    "vmddpm",
    "vmddpm_csm",
    "vmddpm_single_level",
    "vmddpm_cnn_only",
    "vmddpm_ssm_only",
    "vmddpm_sr_zigzag",
    "vmddpm_sr_random",
    "vmddpm_attention",
)
SHAPES = ((1, 1, 4), (4, 4, 4), (6, 8, 4), (5, 7, 3), (8, 8, 2), (16, 16, 4), (7, 3, 2), (32, 32, 8))


# ----------------------------------------------------------------------------- Sequence Regeneration
@pytest.mark.parametrize("mode", SR_MODES)
@pytest.mark.parametrize(("h", "w", "window"), SHAPES)
def test_sr_is_an_exact_invertible_permutation(mode: str, h: int, w: int, window: int) -> None:
    perm, inv = sr_permutation(h, w, mode, window, seed=3)
    assert sorted(perm.tolist()) == list(range(h * w))
    tokens = torch.randn(2, 5, h * w)
    regenerated = tokens[..., perm]
    assert torch.equal(regenerated[..., inv], tokens)
    assert torch.equal(perm[inv], torch.arange(h * w))


def test_sr_window_visits_each_window_contiguously() -> None:
    h, w, win = 8, 12, 4
    perm, _ = sr_permutation(h, w, "window", win)
    rows, cols = perm // w, perm % w
    for start in range(0, h * w, win * win):
        chunk_r, chunk_c = rows[start : start + win * win], cols[start : start + win * win]
        # one window: all tokens share the window's row and column block
        assert len(set((chunk_r // win).tolist())) == 1 and len(set((chunk_c // win).tolist())) == 1
        assert (chunk_r.max() - chunk_r.min()).item() == win - 1


def test_sr_zigzag_steps_between_spatial_neighbours() -> None:
    h, w = 7, 9
    perm, _ = sr_permutation(h, w, "zigzag")
    r, c = perm // w, perm % w
    steps = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
    assert torch.all(steps == 1)


def test_sr_random_is_fixed_by_its_seed() -> None:
    a, _ = sr_permutation(8, 8, "random", seed=1)
    b, _ = sr_permutation(8, 8, "random", seed=1)
    c, _ = sr_permutation(8, 8, "random", seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, torch.arange(64))


def test_sr_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"none \| window"):
        sr_permutation(4, 4, "spiral")


# -------------------------------------------------------------------------------------- cross-scan
def test_cross_scan_without_sr_is_vmamba_four_directions() -> None:
    x = torch.randn(2, 3, 5, 7)
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    expected = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)
    assert torch.equal(cross_scan(x), expected)


@pytest.mark.parametrize("mode", SR_MODES)
@pytest.mark.parametrize(("h", "w", "window"), SHAPES)
def test_cross_merge_of_identity_sequences_is_four_times_the_input(
    mode: str, h: int, w: int, window: int
) -> None:
    x = torch.randn(2, 3, h, w)
    seqs = cross_scan(x, mode, window, 5)
    assert seqs.shape == (2, 4, 3, h * w)
    assert torch.equal(cross_merge(seqs, h, w, mode, window, 5), 4 * x)


@pytest.mark.parametrize("mode", SR_MODES)
def test_scan_directions_are_sr_order_of_map_and_transpose(mode: str) -> None:
    h, w, win = 6, 4, 2
    idx, inv = scan_indices(h, w, mode, win, 0)
    perm, _ = sr_permutation(h, w, mode, win, 0)
    assert torch.equal(idx[0], perm)
    assert torch.equal(idx[2], perm.flip(0))
    assert torch.equal(idx[3], idx[1].flip(0))
    for k in range(4):
        assert torch.equal(idx[k][inv[k]], torch.arange(h * w))


# ------------------------------------------------------------------------------------------- SS2D
def _ss2d(sr: str) -> SS2D:
    return SS2D(
        8, d_state=4, expand=2, d_conv=3, dt_rank="auto", sr=sr, sr_window=2, sr_seed=0, scan_backend="auto"
    )


def test_ss2d_shape_gradients_and_zero_parameter_sr() -> None:
    counts = {mode: count_parameters(_ss2d(mode)) for mode in SR_MODES}
    assert len(set(counts.values())) == 1, counts
    torch.manual_seed(0)
    block = _ss2d("window")
    x = torch.randn(2, 8, 6, 4, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = block.layout.views(block.weights.grad)
    for name in ("A_logs", "Ds", "dt_projs_bias", "x_proj_weight", "dt_projs_weight"):
        assert grads[name].abs().sum() > 0, name
    assert block.resolved_backend  # the backend that actually ran is recorded


def test_sr_changes_the_output_but_not_the_weights() -> None:
    torch.manual_seed(0)
    a = _ss2d("none")
    b = _ss2d("window")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 4, 4)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("sr", SR_MODES)
@pytest.mark.parametrize("hw", [(6, 5), (4, 8)])  # H != W; 6 x 5 is not divisible by the SR window
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ss2d_fused_cpu_op_equals_the_module_path(sr: str, hw: tuple[int, int], dtype: torch.dtype) -> None:
    """The fused CPU op (vmddpm/ops/ss2d_cpu.py) computes the module path's output and the gradients
    of the input and of every weight: to rounding in float64, to 1e-5 in float32."""
    torch.manual_seed(0)
    block = SS2D(
        8, d_state=4, expand=2, d_conv=3, dt_rank="auto", sr=sr, sr_window=4, sr_seed=0, scan_backend="cpu"
    ).to(dtype)
    x = torch.randn(2, 8, *hw, dtype=dtype, requires_grad=True)
    assert fused_applicable(x, block.weights, block.layout)
    gy = torch.randn(2, 8, *hw, dtype=dtype)
    fused = block(x)
    assert fused.grad_fn is not None and "SS2DCpu" in type(fused.grad_fn).__name__
    modules = block.forward_modules(x, device_scan_index(*hw, sr, 4, 0, x.device))
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fused, modules, **tol)
    (gx_f, gw_f), (gx_m, gw_m) = (torch.autograd.grad(y, (x, block.weights), gy) for y in (fused, modules))
    torch.testing.assert_close(gx_f, gx_m, **tol)
    parts_m = block.layout.views(gw_m)
    for name, g in block.layout.views(gw_f).items():
        scale = max(1.0, float(parts_m[name].abs().max()))
        torch.testing.assert_close(g, parts_m[name], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


@pytest.mark.parametrize(
    ("hw", "d_conv", "channels_last"),
    [((2, 3), 5, False), ((1, 7), 3, True), ((3, 3), 5, True), ((5, 1), 3, False)],
    ids=["map-smaller-than-conv", "one-row-channels_last", "3x3-conv5-channels_last", "one-column"],
)
def test_ss2d_fused_cpu_op_edges(hw: tuple[int, int], d_conv: int, channels_last: bool) -> None:
    """Edges of the fused op's kernels (float64, against the module path): conv windows wider than
    the map on both sides, one-row and one-column maps, a channels_last input (copied to NCHW rows)
    and an incoming gradient that is a channel slice of a larger map (as a concatenation's backward
    hands it over: each channel's rows contiguous, the batch stride not)."""
    torch.manual_seed(0)
    block = SS2D(
        6, d_state=3, expand=2, d_conv=d_conv, dt_rank=2, sr="window", sr_window=2, sr_seed=0,
        scan_backend="cpu",
    ).double()  # fmt: skip
    x = torch.randn(3, 6, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gy = torch.randn(3, 10, *hw, dtype=torch.float64)[:, 2:8]  # a channel slice
    fused = block(x)
    assert "SS2DCpu" in type(fused.grad_fn).__name__ and fused.is_contiguous()
    modules = block.forward_modules(x, device_scan_index(*hw, "window", 2, 0, x.device))
    torch.testing.assert_close(fused, modules, rtol=1e-10, atol=1e-12)
    (gx_f, gw_f), (gx_m, gw_m) = (torch.autograd.grad(y, (x, block.weights), gy) for y in (fused, modules))
    torch.testing.assert_close(gx_f, gx_m, rtol=1e-10, atol=1e-12)
    parts_m = block.layout.views(gw_m)
    for name, g in block.layout.views(gw_f).items():
        torch.testing.assert_close(g, parts_m[name], rtol=1e-10, atol=1e-11, msg=name)


def test_ss2d_fused_op_without_autograd_keeps_nothing_and_gives_the_same_output() -> None:
    """Sampling runs under no_grad; a user's code may run under inference_mode (whose tensors cannot
    be saved for a backward, the cached scan table included): both take the op's plain forward and
    give the training forward's output, for a channel-first and a channels_last input."""
    torch.manual_seed(0)
    block = _ss2d("window")
    x = torch.randn(2, 8, 5, 9)  # a map size no other test uses: its scan table is made in inference mode
    with torch.inference_mode():
        inference = block(x.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        plain = block(x)
    trained = block(x)  # then saved for a backward
    trained.sum().backward()
    assert plain.grad_fn is None and not inference.requires_grad
    torch.testing.assert_close(plain, trained.detach(), rtol=0, atol=0)
    torch.testing.assert_close(inference, trained.detach(), rtol=0, atol=0)


def test_ss2d_fused_op_falls_back_under_autocast_and_is_one_parameter_tensor() -> None:
    block = _ss2d("window")
    assert [n for n, _ in block.named_parameters()] == ["weights"]
    assert block.weights.numel() == sum(math.prod(s) for s in block.layout.shapes.values())
    x = torch.randn(1, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_applicable(x, block.weights, block.layout)
        y = block(x)
    assert y.dtype == torch.bfloat16  # the module path ran (its linears autocast)
    assert "SS2DCpu" not in type(y.grad_fn).__name__


def test_ss2d_state_dict_keeps_vmamba_names_and_loads_them() -> None:
    """The packed weights are saved and loaded under VMamba's names and shapes (checkpoints written
    before the packing load unchanged); a missing weight is named by load_state_dict."""
    torch.manual_seed(0)
    a, b = _ss2d("window"), _ss2d("window")
    state = a.state_dict()
    assert list(state) == list(PARTS)
    assert {k: tuple(v.shape) for k, v in state.items()} == a.layout.shapes
    unpacked = {k: v.clone() for k, v in state.items()}  # separate tensors, as an old checkpoint has
    b.load_state_dict(unpacked)
    x = torch.randn(1, 8, 5, 4)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    state[
        "A_logs"
    ].zero_()  # the state dict's tensors are views of the weights (EMA warm-up copies into them)
    assert float(a.layout.views(a.weights.detach())["A_logs"].abs().sum()) == 0.0
    del unpacked["Ds"]
    with pytest.raises(RuntimeError, match="SS2D weights missing from the state dict: Ds"):
        b.load_state_dict(unpacked)


# ------------------------------------------------------------------------------------------ VMUNet
@pytest.fixture
def tiny_cfg(make_cfg):
    return make_cfg(*TINY)


def test_sr_adds_zero_parameters_to_the_network(tiny_cfg) -> None:
    counts = {
        sr: count_parameters(VMUNet(**{**dataclasses.asdict(tiny_cfg.model_config("vmddpm")), "sr": sr}))
        for sr in SR_MODES
    }
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize(
    ("name", "size"),
    [
        # attention over 128*128 tokens is the quadratic case C5 is about: ~40 s on 2 loaded cores
        pytest.param(n, s, marks=pytest.mark.slow) if (n, s) == ("vmddpm_attention", 128) else (n, s)
        for n in VMUNET_PRESETS
        for s in (32, 64, 128)
    ],
)
def test_every_preset_runs_forward_and_backward(tiny_cfg, name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg, name)
    assert isinstance(model, VMUNet)
    # the output conv starts at zero (eps = 0, no gradient upstream of it): give it weights so the
    # backward pass reaches every parameter
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    batch = 2 if size < 128 else 1
    x = torch.randn(batch, 1, size, size)
    t = torch.randint(0, 1000, (batch,))
    eps = model(x, t)
    assert eps.shape == x.shape
    assert torch.isfinite(eps).all()
    torch.nn.functional.mse_loss(eps, torch.randn_like(x)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    mixers = [m for m in model.modules() if isinstance(m, SS2D)]
    assert all(m.layout.views(m.weights.grad)["A_logs"].abs().sum() > 0 for m in mixers)


def test_rectangular_input_and_scalar_timestep(tiny_cfg) -> None:
    model = build_model(tiny_cfg, "vmddpm")
    x = torch.randn(2, 1, 16, 24)
    assert model(x, torch.tensor(7)).shape == x.shape


def test_ablations_differ_where_they_should(tiny_cfg) -> None:
    counts = {n: count_parameters(build_model(tiny_cfg, n)) for n in VMUNET_PRESETS}
    assert (
        counts["vmddpm"] == counts["vmddpm_csm"] == counts["vmddpm_sr_zigzag"] == counts["vmddpm_sr_random"]
    )
    assert counts["vmddpm_single_level"] < counts["vmddpm"]
    assert counts["vmddpm_cnn_only"] < counts["vmddpm"]
    assert counts["vmddpm_ssm_only"] < counts["vmddpm"]
    assert build_model(tiny_cfg, "vmddpm_cnn_only").resolved_scan_backend() == "none"
    assert build_model(tiny_cfg, "vmddpm_attention").resolved_scan_backend() == "none"
    assert build_model(tiny_cfg, "vmddpm").resolved_scan_backend() not in ("none", "auto")


@pytest.mark.parametrize("shape", [(1, 16, 16), (2, 3, 16, 16), (1, 1, 1, 16, 16)])
def test_wrong_rank_or_channels_names_the_expected_shape(tiny_cfg, shape) -> None:
    model = build_model(tiny_cfg, "vmddpm")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))


def test_non_divisible_size_names_the_divisibility(make_cfg) -> None:
    cfg = make_cfg(*TINY, "model.channel_mult=[1, 2, 2]")
    model = build_model(cfg, "vmddpm")
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 18, 16), torch.zeros(1, dtype=torch.long))


def test_both_paths_off_is_a_user_error(make_cfg) -> None:
    cfg = make_cfg(*TINY, "model.cnn_path=false", "model.ssm_path=false")
    with pytest.raises(UserError, match=r"presets\.vmddpm.*switch at least one on"):
        build_model(cfg, "vmddpm")


def _grads(model, x, t):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x, t), x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients(make_cfg) -> None:
    """model.checkpointing recomputes each SSLayer in the backward: the same numbers, less memory."""
    cfg = make_cfg(*TINY, "model.dropout=0.1")  # dropout too: its mask must be replayed exactly
    torch.manual_seed(0)
    plain = build_model(cfg, "vmddpm")
    torch.nn.init.normal_(plain.out[-1].weight, std=0.1)
    ckpt = build_model(make_cfg(*TINY, "model.dropout=0.1", "model.checkpointing=true"), "vmddpm")
    ckpt.load_state_dict(plain.state_dict())
    assert all(layer.checkpointing for layer in ckpt.modules() if hasattr(layer, "checkpointing"))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 900])
    torch.manual_seed(1)
    g_plain = _grads(plain, x, t)
    torch.manual_seed(1)
    g_ckpt = _grads(ckpt, x, t)
    scale = max(float(g.abs().max()) for g in g_plain.values())
    for name, g in g_plain.items():  # shared inputs (the time embedding) sum in another order
        torch.testing.assert_close(g_ckpt[name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)
    plain.eval(), ckpt.eval()
    with torch.no_grad():  # sampling runs without recomputation
        torch.testing.assert_close(ckpt(x, t), plain(x, t))


def test_checkpointing_is_not_part_of_the_model_signature(make_cfg) -> None:
    """A run may switch it on or off on resume: it changes memory, never the weights."""
    a = model_signature(make_cfg(*TINY), "vmddpm")
    b = model_signature(make_cfg(*TINY, "model.checkpointing=true"), "vmddpm")
    assert a == b


@pytest.mark.gpu
def test_deterministic_mode_trains_on_cuda(tiny_cfg) -> None:
    """train.deterministic on a GPU: every op of forward + backward has a deterministic CUDA kernel
    (the pooled MSS levels used adaptive pooling, whose backward has none)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.use_deterministic_algorithms(True)
    try:
        model = build_model(tiny_cfg, "vmddpm").cuda()
        torch.nn.init.normal_(model.out[-1].weight, std=0.1)
        x = torch.randn(2, 1, 32, 32, device="cuda")
        runs = [_grads(model, x, torch.tensor([5, 600], device="cuda")) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for name, g in runs[0].items():
        assert torch.equal(g, runs[1][name]), name
