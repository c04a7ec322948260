"""What the paper-scale matrix costs on a GPU: every preset's train step, images/s, peak memory and
one sampling call; the S6 op per backend; the projected GPU-hours of training + DDPM-1000 sampling
of every dataset x model.

Per preset (params.yaml `presets:`, diffusion families; the GANs' cost is negligible beside them), at
the scale's image size and batch, in one process on one GPU:
- `train_step_s`: median of `--repeats` steps after `--warmup` (forward under the scale's
  `train.amp` autocast, MSE to the noise, backward, the trainer's fused AdamW), `images_per_s`
  = batch / step, `peak_gib`: max_memory_allocated during the steps minus what was allocated
  before them (weights, optimizer state after the warm-up);
- `sample_call_s`: one denoiser call at `sample.batch_size` under no_grad and autocast (what every
  one of the sampler's `sample.steps` calls costs);
- a CUDA out-of-memory error is recorded as `"error": "out of memory"`, not raised.
S6 op per backend: `csm_scan` forward + backward in bf16 for every backend that runs on the device
(cuda = mamba-ssm + Triton scan/merge, triton, pscan) at `--op-shape B D L N` (default the paper
network's full-resolution level: batch 32, 128 channels x 4 directions, 128^2 tokens, N = 16), and
the plain `selective_scan` per backend at `--s6-shape` (default b32, d256, L16384, N16, the shape of
the lean-network issue's mamba-ssm vs pscan figures).
Projection: per dataset x model of the matrix, `train.steps` x train_step_s + (images to generate
/ sample.batch_size) x sample.steps x sample_call_s, where the number of images is
`eval.n_fake` or, when 0, the reference split's size (`--n-fake`; defaults: estimates of the
train splits of the real datasets).

`--device cpu --smoke` runs the whole script at toy sizes on CPU (what the tests do); its numbers
mean nothing. Writes `results/benchmarks/gpu.json` and `gpu.png`. On a GPU machine, from the
repository root: `python benchmarks/bench_gpu.py` (`make bench-gpu`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _measure import command_line, machine_info

log = logging.getLogger("bench_gpu")
ROOT = Path(__file__).resolve().parents[1]
N_FAKE_ESTIMATE = {"chestxray": 4685, "brats2018": 22800, "acdc": 2400}
"""Images per dataset's reference (train) split when `eval.n_fake` is 0: 80 % of ChestXRay's 5,856
images, of ~28,500 brain-containing BraTS2018 flair slices and of ~3,000 ACDC ED/ES slices
(docs/paper.md, the data section). Replace them with `--n-fake` once the data are prepared."""


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: Any, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _autocast(device: Any, amp: str) -> Any:
    import torch

    if device.type != "cuda" or amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,)


def measure_preset(cfg: Any, name: str, device: Any, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train step, images/s, peak memory and one sampling call of preset `name` (see the module)."""
    import torch

    from vmddpm.nn.registry import build_model

    tc, sc = cfg.train, cfg.sample
    out: dict[str, Any] = {"model": name, "family": cfg.preset(name).family, "size": size}
    out |= {"batch": tc.batch_size, "amp": tc.amp, "sample_batch": sc.batch_size}
    try:
        torch.manual_seed(0)
        net = build_model(cfg, name, size).to(device)
        out["params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
        out["scan_backend"] = str(getattr(net, "resolved_scan_backend", lambda d=None: "none")(device))
        opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, fused=True)
        x = torch.randn(tc.batch_size, 1, size, size, device=device)
        t = torch.randint(0, cfg.diffusion.timesteps, (tc.batch_size,), device=device)

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            with _autocast(device, tc.amp):
                loss = torch.nn.functional.mse_loss(net(x, t).float(), x)
            loss.backward()
            opt.step()

        train_step()  # optimizer state, kernels compiled / autotuned
        _sync(device)
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = _timed(train_step, device, args.warmup, args.repeats)
        out["train_step_s"] = statistics.median(times)
        out["images_per_s"] = tc.batch_size / out["train_step_s"]
        if device.type == "cuda":
            out["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        opt.zero_grad(set_to_none=True)
        xs = torch.randn(sc.batch_size, 1, size, size, device=device)
        ts = torch.full((sc.batch_size,), cfg.diffusion.timesteps // 2, device=device)

        @torch.no_grad()
        def sample_call() -> None:
            with _autocast(device, tc.amp):
                net(xs, ts)

        out["sample_call_s"] = statistics.median(_timed(sample_call, device, 1, args.repeats))
    except _oom_types():
        out["error"] = "out of memory"
    finally:
        if device.type == "cuda":  # the closures above die with this frame; hand their memory back
            torch.cuda.empty_cache()
    log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})
    return out


def measure_op(device: Any, shape: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """csm_scan forward + backward per backend at (batch, d, L, N), bf16 tokens on CUDA."""
    import torch

    from vmddpm.ops.cross_scan import CSM_BACKENDS, _unavailable_reason, csm_scan

    b, d, length, n = shape
    k, r = 4, max(1, -(-d // 32))
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s: int, scale: float = 1.0, dtype: Any = torch.float32) -> Any:
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    u, x_dbl = rnd(b, length, d, dtype=dt), rnd(b, length, k, r + 2 * n, scale=0.5, dtype=dt)
    w, bias, dd = rnd(k, d, r, scale=0.5), rnd(k, d, scale=0.5), rnd(k, d)
    a = (-torch.rand(k, d, n, generator=g) - 0.5).to(device).requires_grad_()
    idx = torch.stack([torch.randperm(length, generator=g) for _ in range(k)]).to(device)
    rows = _measure_s6(device, args) if args.s6_shape else []
    for backend in CSM_BACKENDS:
        if backend == "ref" or _unavailable_reason(backend, device) is not None:
            continue
        row: dict[str, Any] = {"op": "csm_scan", "backend": backend, "shape_b_d_l_n": shape}

        def fwd_bwd(backend: str = backend) -> None:
            y = csm_scan(u, x_dbl, w, bias, a, dd, idx, backend=backend)
            y.float().sum().backward()

        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            row["fwd_bwd_s"] = statistics.median(_timed(fwd_bwd, device, 1, args.repeats))
            if device.type == "cuda":
                row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        except _oom_types():
            row["error"] = "out of memory"
        for t in (u, x_dbl, w, bias, dd, a):
            t.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("%s", row)
        rows.append(row)
    return rows


def _measure_s6(device: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The plain S6 op (`selective_scan`, mamba-ssm's signature) forward + backward per backend at
    `--s6-shape` (batch, dim, L, N), with softplus, D and delta_bias, bf16 on CUDA."""
    import torch

    from vmddpm.ops.selective_scan import BACKENDS, _unavailable_reason, selective_scan

    b, d, length, n = args.s6_shape
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*s: int, dtype: Any = dt) -> Any:
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()

    u, delta, bs, cs = rnd(b, d, length), rnd(b, d, length), rnd(b, n, length), rnd(b, n, length)
    a = (-torch.rand(d, n, generator=g) - 0.5).to(device).requires_grad_()
    dd, bias = rnd(d, dtype=torch.float32), rnd(d, dtype=torch.float32)
    rows = []
    for backend in BACKENDS:
        if backend == "ref" or _unavailable_reason(backend, device) is not None:
            continue
        row: dict[str, Any] = {"op": "selective_scan", "backend": backend, "shape_b_d_l_n": args.s6_shape}

        def fwd_bwd(backend: str = backend) -> None:
            y = selective_scan(u, delta, a, bs, cs, dd, delta_bias=bias, delta_softplus=True, backend=backend)
            y.float().sum().backward()

        try:
            row["fwd_bwd_s"] = statistics.median(_timed(fwd_bwd, device, 1, args.repeats))
        except _oom_types():
            row["error"] = "out of memory"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("%s", row)
        rows.append(row)
    return rows


def project(cfg: Any, presets: list[dict[str, Any]], n_fake: dict[str, int]) -> dict[str, Any]:
    """GPU-hours of the matrix (every dataset x model of params.yaml) from the measured presets."""
    by_name = {p["model"]: p for p in presets}
    cells, total = [], 0.0
    for dataset in cfg.datasets:
        images = cfg.eval.n_fake or n_fake[dataset]
        for model in cfg.models:
            p = by_name.get(model)
            if p is None or "train_step_s" not in p:
                cells.append({"dataset": dataset, "model": model, "hours": None})
                continue
            train_h = cfg.train.steps * p["train_step_s"] / 3600
            calls = -(-images // cfg.sample.batch_size) * cfg.sample.steps
            sample_h = calls * p["sample_call_s"] / 3600
            cells.append({"dataset": dataset, "model": model, "train_h": train_h, "sample_h": sample_h})
            total += train_h + sample_h
    return {
        "train_steps": cfg.train.steps,
        "sampler": f"{cfg.sample.sampler}-{cfg.sample.steps}",
        "images_per_dataset": {d: cfg.eval.n_fake or n_fake[d] for d in cfg.datasets},
        "cells": cells,
        "total_gpu_hours": total,
        "missing": [c["model"] for c in cells if c.get("hours", 0) is None],
    }


def plot(presets: list[dict[str, Any]], title: str, path: Path) -> None:
    """Two bar panels per preset: train step (ms) and peak memory (GiB); failures labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vmddpm.io import atomic_path

    names = [p["model"] for p in presets]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label, scale) in zip(
        axes,
        (("train_step_s", "train step (ms)", 1e3), ("peak_gib", "peak GPU memory (GiB)", 1.0)),
        strict=True,
    ):
        vals = [p.get(key, 0.0) * scale for p in presets]
        bars = ax.bar(
            range(len(names)), vals, color=["C0" if p["family"] == "vmunet" else "C1" for p in presets]
        )
        for bar, p, v in zip(bars, presets, vals, strict=True):
            text = p.get("error", f"{v:.3g}")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--scale", default="paper")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", help="presets to measure (default: every diffusion preset)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--op-shape", type=int, nargs=4, default=[32, 128, 16384, 16], metavar=("B", "D", "L", "N")
    )
    parser.add_argument(
        "--s6-shape", type=int, nargs=4, default=[32, 256, 16384, 16], metavar=("B", "D", "L", "N")
    )
    parser.add_argument("--n-fake", action="append", default=[], metavar="DATASET=N")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (CPU tests); numbers mean nothing")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "gpu.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import torch

    from vmddpm.config import load_config
    from vmddpm.io import write_text

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible; on a CPU machine run with --device cpu --smoke")
    overrides = list(args.overrides)
    if args.smoke:
        args.op_shape, args.s6_shape, args.warmup, args.repeats = [2, 8, 64, 4], [2, 8, 64, 4], 1, 2
        overrides += [
            *("train.batch_size=2", "sample.batch_size=2", "data.image_size=16"),
            *("model.base_channels=8", "model.channel_mult=[1,2]", "model.blocks_per_stage=1"),
            *("model.d_state=4", "baselines.unet_attn.base_channels=8"),
            *("baselines.unet_attn.channel_mult=[1,2]", "baselines.dit.hidden_size=32"),
            *("baselines.dit.heads=2", "baselines.dit.depth=1"),
        ]
    cfg = load_config(args.params, scale=args.scale, overrides=overrides)
    size = cfg.data.image_size
    names = args.models or [n for n, p in cfg.presets.items() if p.family != "gan"]
    n_fake = {**N_FAKE_ESTIMATE, **{k: int(v) for k, v in (s.split("=", 1) for s in args.n_fake)}}
    presets = [measure_preset(cfg, n, device, size, args) for n in names]
    result = {
        "command": command_line(),
        "machine": machine_info(torch.get_num_threads(), str(device)),
        "scale": args.scale,
        "smoke": args.smoke,
        "overrides": overrides,
        "image_size": size,
        "model_config": dataclasses.asdict(cfg.model),
        "method": __doc__.split("\n\n", 2)[1],
        "presets": presets,
        "op": measure_op(device, args.op_shape, args),
        "projection": project(cfg, presets, n_fake),
    }
    out = Path(args.out)
    write_text(out, json.dumps(result, indent=1) + "\n")
    title = f"{args.scale} scale, {size}², batch {cfg.train.batch_size}, amp {cfg.train.amp}, {device}"
    if args.smoke:
        title += " (smoke run: toy sizes, numbers mean nothing)"
    plot(presets, title, out.with_suffix(".png"))
    log.info("wrote %s (projected %.0f GPU-hours)", out, result["projection"]["total_gpu_hours"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
