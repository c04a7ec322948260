"""VM-DDPM's denoiser: a U-Net of SSLayers whose MSSBlocks fuse a CNN path with a CSM (S6) path.

Structure (docs/paper.md, "Model"): stem conv -> encoder stages (SSLayers, stride-2 downsampling) ->
bottleneck (two SSLayers) -> decoder stages (SSLayers on [h, skip], upsampling) -> norm, act, conv.
Every SSLayer is a residual unit conditioned on the timestep; its second half is an MSSBlock that
runs a local CNN path and a global CSM path at `mss_levels` resolutions and fuses them.

`mixer="attention"` swaps every CSM for multi-head self-attention over the H*W tokens and keeps the
rest identical: the network the paper's linear-vs-quadratic cost claim (C5) is measured against.

No config import here (layer rule: nn knows nothing of params.yaml); the constructor takes the
plain values of `ModelConfig`, so `VMUNet(**dataclasses.asdict(model_config))` builds it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vmddpm.nn.layers import Downsample, TimeEmbedding, Upsample, group_norm, zero_module
from vmddpm.nn.scan2d import SR_MODES, SS2D
from vmddpm.ops.cross_scan import explain_csm_backend


class SelfAttention2D(nn.Module):
    """Multi-head self-attention over all H*W tokens (channel-first in and out): O((HW)^2) cost."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention needs channels divisible by attn_heads: {channels} % {heads} != 0")
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, dh)
        y = self.out_proj(y.transpose(1, 2).reshape(b, h * w, c))
        return y.transpose(1, 2).reshape(b, c, h, w)


def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    """Average-pool by `f` to ceil(H/f) x ceil(W/f). When f divides H and W (every map of a network
    whose input passes `check_input` at the default levels) this is `avg_pool2d`, the same numbers as
    `adaptive_avg_pool2d` but with a deterministic CUDA backward (adaptive pooling's backward has
    none, so `train.deterministic: true` failed at the first backward on a GPU)."""
    h, w = x.shape[-2:]
    if h % f == 0 and w % f == 0:
        return F.avg_pool2d(x, f)
    return F.adaptive_avg_pool2d(x, (math.ceil(h / f), math.ceil(w / f)))


class MSSBlock(nn.Module):
    """Multi-level fusion of a CNN path (local) and a CSM path (global), residual.

    Level 0 runs at full resolution; level k on the map average-pooled by 2^k, its output upsampled
    back (bilinear). All branch outputs are concatenated and projected by a 1x1 conv, then added to
    the input. Pooled levels give the global path a coarse, cheap view of the structure while level
    0 keeps the texture; `mss_levels=1` is the single-level ablation.
    """

    def __init__(
        self,
        channels: int,
        *,
        mss_levels: int,
        cnn_path: bool,
        ssm_path: bool,
        mixer: str,
        attn_heads: int,
        ssm_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        if not (cnn_path or ssm_path):
            raise ValueError("MSSBlock needs cnn_path or ssm_path (or both) switched on")
        if mss_levels < 1:
            raise ValueError(f"mss_levels must be >= 1, got {mss_levels}")
        self.levels = mss_levels
        self.cnn = (
            nn.ModuleList(
                nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU())
                for _ in range(mss_levels)
            )
            if cnn_path
            else None
        )
        if not ssm_path:
            self.mix = None
        elif mixer == "csm":
            self.mix = nn.ModuleList(SS2D(channels, **ssm_kwargs) for _ in range(mss_levels))
        elif mixer == "attention":
            self.mix = nn.ModuleList(SelfAttention2D(channels, attn_heads) for _ in range(mss_levels))
        else:
            raise ValueError(f"mixer must be csm | attention, got {mixer!r}")
        branches = mss_levels * (int(cnn_path) + int(ssm_path))
        self.fuse = nn.Conv2d(branches * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs: list[torch.Tensor] = []
        for k in range(self.levels):
            xk = x if k == 0 else _pool(x, 2**k)
            ys = [path[k](xk) for path in (self.cnn, self.mix) if path is not None]
            if k == 0:  # full resolution: straight into the one concatenation below
                outs.extend(ys)
                continue
            # one upsampling of the level's branches together (bilinear is per channel)
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
            outs.append(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return x + self.fuse(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))


class SSLayer(nn.Module):
    """Residual unit: norm -> act -> conv, + projected time embedding, norm -> act -> MSSBlock.

    A 1x1 conv maps the input onto the output channels when they differ. With `checkpointing` the
    layer's activations are recomputed in the backward instead of kept (memory for compute).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        dropout: float,
        mss: dict[str, Any],
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        # p = 0 (the paper preset) is no layer at all: nn.Dropout(0) still draws a mask every step
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mss = MSSBlock(out_ch, **mss)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # activation checkpointing (improved-diffusion's use_checkpoint): keep only the layer's
            # inputs, recompute its activations in the backward; the RNG state (dropout) is replayed
            return checkpoint(self._forward, x, temb, use_reentrant=False)
        return self._forward(x, temb)

    def _forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.mss(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class EncoderStage(nn.Module):
    """SSLayers at one resolution, then (except the deepest stage) a stride-2 downsample.

    Returns the stage output and appends every intermediate to `skips` for the decoder.
    """

    def __init__(self, layers: list[SSLayer], down: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.down = down

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, temb)
            skips.append(h)
        if self.down is not None:
            h = self.down(h)
            skips.append(h)
        return h


class Bottleneck(nn.Module):
    def __init__(self, layers: list[SSLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, temb)
        return h


class DecoderStage(nn.Module):
    """SSLayers on [h, skip] (one skip popped per layer), then (except the top stage) an upsample."""

    def __init__(self, layers: list[SSLayer], up: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.up = up

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            h = layer(torch.cat([h, skips.pop()], dim=1), temb)
        if self.up is not None:
            h = self.up(h)
        return h


class VMUNet(nn.Module):
    """VM-DDPM's epsilon network: `forward(x (B, 1, H, W), t (B,)) -> eps (B, 1, H, W)`.

    H and W must be divisible by 2^(len(channel_mult) - 1) (one halving per stage transition).
    """

    def __init__(
        self,
        *,
        base_channels: int,
        channel_mult: list[int] | tuple[int, ...],
        blocks_per_stage: int,
        time_embed_dim: int,
        d_state: int,
        ssm_expand: int,
        d_conv: int,
        dt_rank: int | str,
        sr: str,
        sr_window: int,
        sr_seed: int,
        mss_levels: int,
        cnn_path: bool,
        ssm_path: bool,
        mixer: str,
        attn_heads: int,
        dropout: float,
        scan_backend: str,
        checkpointing: bool = False,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if not (cnn_path or ssm_path):
            raise ValueError("model: cnn_path and ssm_path are both false; switch at least one on")
        if sr not in SR_MODES:
            raise ValueError(f"model.sr must be one of {' | '.join(SR_MODES)}, got {sr!r}")
        if mixer not in ("csm", "attention"):
            raise ValueError(f"model.mixer must be csm | attention, got {mixer!r}")
        self.in_channels = in_channels
        self.mixer = mixer
        self.uses_ssm = ssm_path and mixer == "csm"
        self.scan_backend = scan_backend
        self.factor = 2 ** (len(channel_mult) - 1)
        mss = dict(
            mss_levels=mss_levels,
            cnn_path=cnn_path,
            ssm_path=ssm_path,
            mixer=mixer,
            attn_heads=attn_heads,
            ssm_kwargs=dict(
                d_state=d_state,
                expand=ssm_expand,
                d_conv=d_conv,
                dt_rank=dt_rank,
                sr=sr,
                sr_window=sr_window,
                sr_seed=sr_seed,
                scan_backend=scan_backend,
            ),
        )

        def layer(cin: int, cout: int) -> SSLayer:
            return SSLayer(cin, cout, time_embed_dim, dropout, mss, checkpointing)

        self.time_embed = TimeEmbedding(time_embed_dim)
        ch = base_channels * channel_mult[0]
        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_chs = [ch]
        encoder = []
        for i, mult in enumerate(channel_mult):
            out = base_channels * mult
            layers = []
            for _ in range(blocks_per_stage):
                layers.append(layer(ch, out))
                ch = out
                skip_chs.append(ch)
            last = i == len(channel_mult) - 1
            if not last:
                skip_chs.append(ch)
            encoder.append(EncoderStage(layers, None if last else Downsample(ch)))
        self.encoder = nn.ModuleList(encoder)
        self.bottleneck = Bottleneck([layer(ch, ch), layer(ch, ch)])
        decoder = []
        for i, mult in reversed(list(enumerate(channel_mult))):
            out = base_channels * mult
            layers = []
            for _ in range(blocks_per_stage + 1):
                layers.append(layer(ch + skip_chs.pop(), out))
                ch = out
            decoder.append(DecoderStage(layers, Upsample(ch) if i else None))
        self.decoder = nn.ModuleList(decoder)
        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))
        )

    def resolved_scan_backend(self, device: torch.device | str | None = None) -> str:
        """The S6 backend this network runs on `device` (default: where its parameters are);
        "none" when it has no S6 path (CNN-only or attention mixer). Train logs it."""
        return self.explain_scan_backend(device)[0]

    def explain_scan_backend(self, device: torch.device | str | None = None) -> tuple[str, str]:
        """(backend, why) of `resolved_scan_backend`: train and sample log both."""
        if not self.uses_ssm:
            return "none", "no S6 path (CNN-only or attention mixer)"
        if device is None:
            device = next(self.parameters()).device
        return explain_csm_backend(self.scan_backend, torch.device(device))

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError naming the expected shape; the diffusion and train layers call forward directly."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"VMUNet expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"VMUNet needs H and W divisible by {self.factor} (2^(len(channel_mult)-1)), got {h}x{w}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"VMUNet expects timesteps of shape ({x.shape[0]},), got {tuple(t.shape)}")
        temb = self.time_embed(t)
        skips: list[torch.Tensor] = []
        h = self.stem(x)
        skips.append(h)
        for stage in self.encoder:
            h = stage(h, temb, skips)
        h = self.bottleneck(h, temb)
        for stage in self.decoder:
            h = stage(h, temb, skips)
        return self.out(h)
