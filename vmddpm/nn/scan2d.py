"""2-D selective scan: cross-scan / cross-merge, Sequence Regeneration (SR) and the CSM block (SS2D).

Why one index table: VMamba's cross-scan unrolls a (H, W) map into four 1-D sequences (row-major,
column-major, and both reversed), runs S6 on each and folds the outputs back (cross-merge). The
paper's Sequence Regeneration (SR) re-orders the tokens before S6 and restores the layout after it.
Both are token permutations, so here they are composed into ONE index per direction:
`scan_indices(H, W, sr, ...)` returns `idx` (4, L) with `seq_k[p] = token[idx[k, p]]` and its
inverse. The CSM never builds the sequences: its S6 kernels read the map's tokens through `idx`
(`vmddpm/ops/cross_scan.py`), so cross-scan, SR and cross-merge cost no copy and no parameter, and
`sr="none"` is exactly VMamba's cross-scan. `cross_scan` / `cross_merge` below spell the same
thing out with gathers (the definition the kernels are tested against).

SR rules (each an exact permutation of the row-major token order of an (H, W) map; the column-major
directions apply the same rule to the transposed map, and the reversed directions flip both):
- `none`: row-major (VMamba).
- `window`: the map is tiled by `window` x `window` windows (clipped at the border); windows are
  visited in row-major order and the tokens of a window row-major, so S6 sees each spatially
  continuous neighbourhood as one contiguous stretch of its sequence.
- `zigzag`: boustrophedon (snake) order: even rows left to right, odd rows right to left, so
  consecutive tokens are always spatial neighbours.
- `random`: a fixed random permutation drawn from `seed` (the same for every step and sample): a
  control that destroys spatial continuity.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vmddpm.ops.cross_scan import csm_scan, resolve_csm_backend
from vmddpm.ops.ss2d_cpu import fused_applicable, ss2d_cpu
from vmddpm.ops.ss2d_layout import PARTS, SS2DLayout

SR_MODES: tuple[str, ...] = ("none", "window", "zigzag", "random")
K_DIRECTIONS = 4


# ------------------------------------------------------------------------------ Sequence Regeneration
@functools.lru_cache(maxsize=256)
def _sr_order(h: int, w: int, mode: str, window: int, seed: int) -> np.ndarray:
    """Row-major token indices of an (h, w) map in the order SR `mode` visits them."""
    n = h * w
    if mode == "none":
        return np.arange(n, dtype=np.int64)
    if mode == "window":
        if window < 1:
            raise ValueError(f"sr_window must be >= 1, got {window}")
        i, j = np.divmod(np.arange(n, dtype=np.int64), w)
        n_wc = -(-w // window)  # windows per row (the last one may be clipped)
        window_id = (i // window) * n_wc + (j // window)
        # stable sort by window id keeps row-major order inside each (possibly clipped) window
        return np.argsort(window_id, kind="stable").astype(np.int64)
    if mode == "zigzag":
        grid = np.arange(n, dtype=np.int64).reshape(h, w)
        grid[1::2] = grid[1::2, ::-1]
        return grid.reshape(-1).copy()
    if mode == "random":
        rng = np.random.default_rng([seed, h, w])
        return rng.permutation(n).astype(np.int64)
    raise ValueError(f"sr must be one of {' | '.join(SR_MODES)}, got {mode!r}")


def sr_permutation(
    h: int, w: int, mode: str, window: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) of SR `mode` on an (h, w) map, as LongTensors of length h*w (cached).

    `seq = tokens[..., perm]` regenerates the sequence; `seq[..., inverse]` restores row-major order.
    `window` and `seed` are only read by the modes that use them.
    """
    perm = _sr_order(h, w, mode, window, seed)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=np.int64)
    return torch.from_numpy(perm.copy()), torch.from_numpy(inv)


@functools.lru_cache(maxsize=256)
def _scan_tables(h: int, w: int, mode: str, window: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = h * w
    d0 = _sr_order(h, w, mode, window, seed)
    t = _sr_order(w, h, mode, window, seed)  # the rule on the transposed (w, h) map
    a, b = np.divmod(t, h)  # transposed position (a, b) is original pixel (b, a)
    d1 = b * w + a
    idx = np.stack([d0, d1, d0[::-1], d1[::-1]])
    inv = np.empty_like(idx)
    rows = np.arange(K_DIRECTIONS)[:, None]
    inv[rows, idx] = np.arange(n, dtype=np.int64)[None, :]
    return idx, inv


def scan_indices(
    h: int, w: int, mode: str, window: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, inv), each (4, h*w): direction k's sequence is `tokens[idx[k]]`; `seq_k[inv[k]]` undoes it."""
    idx, inv = _scan_tables(h, w, mode, window, seed)
    return torch.from_numpy(idx.copy()), torch.from_numpy(inv.copy())


@functools.lru_cache(maxsize=256)
def device_scan_index(
    h: int, w: int, mode: str, window: int, seed: int, device: torch.device
) -> torch.Tensor:
    """`idx` of `scan_indices` as a (4, h*w) LongTensor on `device`, built once per map size and mode:
    the table the fused CSM kernels read the tokens through (vmddpm/ops/cross_scan.py). Made outside
    inference mode even when first asked for inside it: the cached table is saved for backwards later."""
    with torch.inference_mode(False):
        return torch.from_numpy(_scan_tables(h, w, mode, window, seed)[0].copy()).to(device)


def cross_scan(x: torch.Tensor, sr: str = "none", window: int = 1, seed: int = 0) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): the four scan directions, each in SR order.

    The readable definition of what the index tables mean; the network never materialises these
    sequences (the fused CSM op reads the map through the tables)."""
    b, c, h, w = x.shape
    idx = device_scan_index(h, w, sr, window, seed, x.device)
    return x.reshape(b, c, h * w)[:, :, idx].transpose(1, 2)


def cross_merge(
    y: torch.Tensor, h: int, w: int, sr: str = "none", window: int = 1, seed: int = 0
) -> torch.Tensor:
    """(B, 4, C, H*W) -> (B, C, H, W): undo each direction's order and sum the four (the adjoint of
    `cross_scan`)."""
    b, k, c, n = y.shape
    if k != K_DIRECTIONS or n != h * w:
        raise ValueError(f"cross_merge expects (B, 4, C, {h * w}), got {tuple(y.shape)}")
    inv = torch.from_numpy(_scan_tables(h, w, sr, window, seed)[1].copy()).to(y.device)
    return torch.gather(y, 3, inv[None, :, None, :].expand(b, k, c, n)).sum(1).view(b, c, h, w)


# ------------------------------------------------------------------------------------- CSM (SS2D)
class SS2D(nn.Module):
    """The Cross-Scan Module: VMamba's SS2D with Sequence Regeneration around its four S6 scans.

    in_proj (to x and gate z) -> depth-wise conv -> SiLU -> per direction x_proj to (dt, B, C) ->
    cross-scan (SR order), dt_proj, S6, cross-merge (SR undone) as one op (`csm_scan`) -> LayerNorm
    -> * SiLU(z) -> out_proj. Input and output are channel-first (B, C, H, W); inside, tokens are
    channel-last (B, H*W, d). x_proj is per token, so it runs once on the map instead of once per
    scan direction's copy. Weights per direction follow VMamba (`A_logs`, `Ds`, `dt_projs_*`,
    `x_proj_weight`), so SR changes only the order, never the count.

    The eleven weights live in ONE parameter, `weights` (`vmddpm/ops/ss2d_layout.py` says where each
    sits and why); the state dict still holds them under VMamba's names, so checkpoints written
    before the packing load unchanged. On CPU in float32/float64 without autocast the block runs as
    one fused autograd op (`vmddpm/ops/ss2d_cpu.py`); `forward_modules` below is the definition and
    every other case's path.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int,
        expand: int,
        d_conv: int,
        dt_rank: int | str,
        sr: str,
        sr_window: int,
        sr_seed: int,
        scan_backend: str,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        if sr not in SR_MODES:
            raise ValueError(f"sr must be one of {' | '.join(SR_MODES)}, got {sr!r}")
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.sr, self.sr_window, self.sr_seed = sr, sr_window, sr_seed
        self.scan_backend = scan_backend
        self.resolved_backend: str | None = None  # set on the first forward: what actually ran
        self.resolved_backend_device: torch.device | None = None
        k, n, r = K_DIRECTIONS, d_state, self.dt_rank
        self.layout = SS2DLayout(d_model, d_inner, d_state, r, d_conv, K_DIRECTIONS)

        # VMamba's initialisation, drawn in VMamba's order (the same weights as unpacked modules)
        in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding="same", groups=d_inner)
        bound = d_inner**-0.5
        x_proj_weight = torch.empty(k, r + 2 * n, d_inner).uniform_(-bound, bound)
        dt_std = r**-0.5
        dt_projs_weight = torch.empty(k, d_inner, r).uniform_(-dt_std, dt_std)
        # dt initialised log-uniform in [dt_min, dt_max] through softplus^-1 (Mamba's init)
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        out_norm = nn.LayerNorm(d_inner)
        out_proj = nn.Linear(d_inner, d_model, bias=False)
        parts = {
            "x_proj_weight": x_proj_weight,
            "dt_projs_weight": dt_projs_weight,
            "dt_projs_bias": dt + torch.log(-torch.expm1(-dt)),
            "A_logs": torch.log(torch.arange(1, n + 1, dtype=torch.float32).repeat(k * d_inner, 1)),
            "Ds": torch.ones(k * d_inner),
            "in_proj.weight": in_proj.weight,
            "conv2d.weight": conv2d.weight,
            "conv2d.bias": conv2d.bias,
            "out_norm.weight": out_norm.weight,
            "out_norm.bias": out_norm.bias,
            "out_proj.weight": out_proj.weight,
        }
        self.weights = nn.Parameter(self.layout.pack(parts))
        self.register_state_dict_post_hook(_unpack_state)
        self.register_load_state_dict_pre_hook(_pack_state)

    def parts(self) -> dict[str, torch.Tensor]:
        """The block's weights by VMamba's names, as differentiable views of `weights`."""
        return self.layout.split(self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.resolved_backend is None or self.resolved_backend_device != x.device:
            self.resolved_backend = resolve_csm_backend(self.scan_backend, x.device)
            self.resolved_backend_device = x.device
        idx = device_scan_index(h, w, self.sr, self.sr_window, self.sr_seed, x.device)
        if self.resolved_backend == "cpu" and fused_applicable(x, self.weights, self.layout):
            return ss2d_cpu(x, self.weights, idx, self.layout)
        return self.forward_modules(x, idx)

    def forward_modules(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The block composed of torch ops (autograd through each): the definition of the fused op."""
        b, _, h, w = x.shape
        k, n, d = K_DIRECTIONS, self.d_state, self.d_inner
        p = self.parts()
        xz = F.linear(x.permute(0, 2, 3, 1), p["in_proj.weight"])  # (B, H, W, 2 * d_inner)
        xi, z = xz.chunk(2, dim=-1)
        # channels_last: the depth-wise conv reads and writes (B, H, W, d) memory, so the tokens
        # below are a free view, not a copy
        xi = xi.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        conv = F.conv2d(xi, p["conv2d.weight"], p["conv2d.bias"], padding="same", groups=d)
        u = F.silu(conv).permute(0, 2, 3, 1).reshape(b, h * w, d)
        x_dbl = F.linear(u, p["x_proj_weight"].view(-1, d)).view(b, h * w, k, -1)
        y = csm_scan(
            u,
            x_dbl,
            p["dt_projs_weight"],
            p["dt_projs_bias"],
            -torch.exp(p["A_logs"]).view(k, d, n),
            p["Ds"].view(k, d),
            idx,
            backend=self.resolved_backend or self.scan_backend,
        )
        norm = (p["out_norm.weight"], p["out_norm.bias"], self.layout.norm_eps)
        y = F.layer_norm(y.view(b, h, w, d), (d,), *norm)
        return F.linear(y * F.silu(z), p["out_proj.weight"]).permute(0, 3, 1, 2)


def unpacked_param_counts(net: nn.Module) -> list[int]:
    """For each parameter of `net`, in `parameters()` order (an optimizer's order): how many parameter
    tensors it was before an SS2D's weights were packed into one (len(PARTS) for an SS2D's `weights`,
    1 for any other), so that an optimizer state saved then can be repacked
    (`vmddpm.trainkit.repack_adam_state`)."""
    packed = {id(m.weights) for m in net.modules() if isinstance(m, SS2D)}
    return [len(PARTS) if id(p) in packed else 1 for p in net.parameters()]


def _unpack_state(module: SS2D, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: VMamba's named weights (views of the packed tensor) instead of `weights`."""
    flat = state.pop(prefix + "weights")
    for name, view in module.layout.views(flat).items():
        state[prefix + name] = view


def _pack_state(
    module: SS2D,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook: VMamba's named weights packed into `weights`; some of them missing is
    an error naming those."""
    keys = [prefix + name for name in PARTS]
    missing = [key for key in keys if key not in state]
    if prefix + "weights" in state or len(missing) == len(keys):
        return  # the packed form, or nothing of this block: load_state_dict reports what it lacks
    if missing:
        error_msgs.append(f"SS2D weights missing from the state dict: {', '.join(missing)}")
        return
    try:
        flat = module.layout.pack({name: state[key] for name, key in zip(PARTS, keys, strict=True)})
    except ValueError as exc:
        error_msgs.append(f"{prefix.rstrip('.') or 'SS2D'}: {exc}")
        return
    for key in keys:
        del state[key]
    state[prefix + "weights"] = flat


# Alias: the paper calls this block the Cross-Scan Module (CSM).
CrossScan2D = SS2D
