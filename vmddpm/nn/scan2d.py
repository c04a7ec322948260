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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vmddpm.ops.cross_scan import csm_scan, resolve_csm_backend

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
    the table the fused CSM kernels read the tokens through (vmddpm/ops/cross_scan.py)."""
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
    scan direction's copy. Parameters per direction follow VMamba (`A_logs`, `Ds`, `dt_projs_*`,
    `x_proj_weight`), so SR changes only the order, never the count, and checkpoints written before
    the fused op load unchanged.
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

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding="same", groups=d_inner)
        bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d_inner).uniform_(-bound, bound))
        dt_std = r**-0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, r).uniform_(-dt_std, dt_std))
        # dt initialised log-uniform in [dt_min, dt_max] through softplus^-1 (Mamba's init)
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        k, n, r, d = K_DIRECTIONS, self.d_state, self.dt_rank, self.d_inner
        xz = self.in_proj(x.permute(0, 2, 3, 1))  # (B, H, W, 2 * d_inner)
        xi, z = xz.chunk(2, dim=-1)
        # channels_last: the depth-wise conv reads and writes (B, H, W, d) memory, so the tokens
        # below are a free view, not a copy
        xi = xi.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        u = F.silu(self.conv2d(xi)).permute(0, 2, 3, 1).reshape(b, h * w, d)
        x_dbl = F.linear(u, self.x_proj_weight.view(k * (r + 2 * n), d)).view(b, h * w, k, r + 2 * n)
        if self.resolved_backend is None or self.resolved_backend_device != x.device:
            self.resolved_backend = resolve_csm_backend(self.scan_backend, x.device)
            self.resolved_backend_device = x.device
        y = csm_scan(
            u,
            x_dbl,
            self.dt_projs_weight,
            self.dt_projs_bias,
            -torch.exp(self.A_logs).view(k, d, n),
            self.Ds.view(k, d),
            device_scan_index(h, w, self.sr, self.sr_window, self.sr_seed, x.device),
            backend=self.resolved_backend,
        )
        y = self.out_norm(y.view(b, h, w, d)) * F.silu(z)
        return self.out_proj(y).permute(0, 3, 1, 2)


# Alias: the paper calls this block the Cross-Scan Module (CSM).
CrossScan2D = SS2D
