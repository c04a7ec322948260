"""2-D selective scan: cross-scan / cross-merge, Sequence Regeneration (SR) and the CSM block (SS2D).

Why one index table: VMamba's cross-scan unrolls a (H, W) map into four 1-D sequences (row-major,
column-major, and both reversed), runs S6 on each and folds the outputs back (cross-merge). The
paper's Sequence Regeneration (SR) re-orders the tokens before S6 and restores the layout after it.
Both are token permutations, so here they are composed into ONE gather index per direction:
`scan_indices(H, W, sr, ...)` returns `idx` (4, L) with `seq_k[p] = token[idx[k, p]]` and its
inverse. Scanning is then a single `index_select`, merging a single `index_select` and a sum; SR
costs no parameters and no extra pass, and `sr="none"` is exactly VMamba's cross-scan.

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

from vmddpm.ops.selective_scan import resolve_backend, selective_scan

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
def _device_tables(
    h: int, w: int, mode: str, window: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, inv) as (1, 4, 1, L) LongTensors on `device`, ready to expand for `torch.gather`."""
    idx, inv = _scan_tables(h, w, mode, window, seed)
    shape = (1, K_DIRECTIONS, 1, h * w)
    return (
        torch.from_numpy(idx.copy()).view(shape).to(device),
        torch.from_numpy(inv.copy()).view(shape).to(device),
    )


def _scan(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, C, L) -> (B, 4, C, L): gather every direction straight into its final layout."""
    b, c, n = x.shape
    return torch.gather(x.unsqueeze(1).expand(b, K_DIRECTIONS, c, n), 3, idx.expand(b, K_DIRECTIONS, c, n))


def _merge(y: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(B, 4, C, L) -> (B, C, L): put every direction back in row-major order and sum."""
    return torch.gather(y, 3, inv.expand(y.shape)).sum(1)


class _CrossScan(torch.autograd.Function):
    """Scan and merge are each other's adjoint (a permutation's transpose is its inverse), so each
    one's backward is the other's forward: two gathers, no scatter-add and no zero-filled buffers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        return _scan(x, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return _merge(grad.contiguous(), inv), None, None


class _CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        return _merge(y, inv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        return _scan(grad.contiguous(), idx), None, None


def cross_scan(x: torch.Tensor, sr: str = "none", window: int = 1, seed: int = 0) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): the four scan directions, each in SR order."""
    b, c, h, w = x.shape
    idx, inv = _device_tables(h, w, sr, window, seed, x.device)
    return _CrossScan.apply(x.reshape(b, c, h * w), idx, inv)


def cross_merge(
    y: torch.Tensor, h: int, w: int, sr: str = "none", window: int = 1, seed: int = 0
) -> torch.Tensor:
    """(B, 4, C, H*W) -> (B, C, H, W): undo each direction's order and sum the four."""
    b, k, c, n = y.shape
    if k != K_DIRECTIONS or n != h * w:
        raise ValueError(f"cross_merge expects (B, 4, C, {h * w}), got {tuple(y.shape)}")
    idx, inv = _device_tables(h, w, sr, window, seed, y.device)
    return _CrossMerge.apply(y.contiguous(), idx, inv).view(b, c, h, w)


# ------------------------------------------------------------------------------------- CSM (SS2D)
class SS2D(nn.Module):
    """The Cross-Scan Module: VMamba's SS2D with Sequence Regeneration around its four S6 scans.

    in_proj (to x and gate z) -> depth-wise conv -> SiLU -> cross-scan (SR order) -> per direction
    x_proj to (dt, B, C) and dt_proj -> S6 -> cross-merge (SR undone) -> LayerNorm -> * SiLU(z) ->
    out_proj. Input and output are channel-first (B, C, H, W). Parameters per direction follow VMamba
    (`A_logs`, `Ds`, `dt_projs_*`, `x_proj_weight`), so SR changes only the order, never the count.
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
        length, k, n, r = h * w, K_DIRECTIONS, self.d_state, self.dt_rank
        xz = self.in_proj(x.permute(0, 2, 3, 1))  # (B, H, W, 2 * d_inner)
        xi, z = xz.chunk(2, dim=-1)
        xi = F.silu(self.conv2d(xi.permute(0, 3, 1, 2).contiguous()))  # (B, D, H, W)

        xs = cross_scan(xi, self.sr, self.sr_window, self.sr_seed)  # (B, K, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)

        if self.resolved_backend is None or self.resolved_backend_device != x.device:
            self.resolved_backend = resolve_backend(self.scan_backend, x.device)
            self.resolved_backend_device = x.device
        y = selective_scan(
            xs.reshape(b, k * self.d_inner, length).float(),
            dts.reshape(b, k * self.d_inner, length).float(),
            -torch.exp(self.A_logs.float()),
            bs.float().contiguous(),
            cs.float().contiguous(),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.resolved_backend,
        )
        y = cross_merge(y.view(b, k, self.d_inner, length), h, w, self.sr, self.sr_window, self.sr_seed)
        y = self.out_norm(y.permute(0, 2, 3, 1).to(z.dtype)) * F.silu(z)
        return self.out_proj(y).permute(0, 3, 1, 2).contiguous()


# Alias: the paper calls this block the Cross-Scan Module (CSM).
CrossScan2D = SS2D
