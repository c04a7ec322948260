"""Claim C5: VM-DDPM's cost grows linearly with the number of pixels, attention's quadratically.

Measures one training step (forward + backward + AdamW step, batch `--batch`) of the same VM-DDPM
network with `mixer: csm` (the paper's Cross-Scan Module, S6) and `mixer: attention` (multi-head
self-attention over the H*W tokens in its place) at `--sizes` (default 64, 128, 256), at a fixed
small width (the demo architecture of params.yaml unless `--set model.KEY=VALUE`).

Method:
- time: median wall time of the timed steps after `--warmup` untimed steps (at least `--repeats`
  steps, fewer only when one step alone exceeds `--budget-s`).
- memory: each (mixer, size) runs in a fresh process. On CUDA: `torch.cuda.max_memory_allocated`
  during the steps minus the allocation before them. On CPU: the process's peak resident set
  (VmHWM) after the steps minus its resident set right before them: the extra memory a training step
  needs (activations, gradients, optimizer state), as the OS sees it (tracemalloc does not see
  torch's allocator).
- growth: the 256^2 / 128^2 ratio of each (4x the pixels): linear cost gives ~4x, quadratic ~16x.

Writes `results/benchmarks/scaling.json` and `results/benchmarks/scaling.png` (log-log time vs
pixels) atomically. Run: `.venv/bin/python benchmarks/bench_scaling.py` from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_scaling")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(
    arch: dict[str, Any],
    size: int,
    batch: int,
    warmup: int,
    repeats: int,
    budget_s: float,
    device: str,
    threads: int,
) -> dict[str, Any]:
    """One (mixer, size) point; runs in its own process so peak memory belongs to it alone."""
    import torch

    from vmddpm.nn.vmunet import VMUNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = VMUNet(**arch).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    noise = torch.randn_like(x)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, t), noise)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb("VmRSS") * 1024
    times: list[float] = []
    for _ in range(warmup + repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    timed = times[warmup:] or times[-1:]  # a single very slow step is its own measurement
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024
    return {
        "mixer": arch["mixer"],
        "size": size,
        "pixels": size * size,
        "batch": batch,
        "step_s_median": statistics.median(timed),
        "step_s_all": times,
        "warmup_steps": min(warmup, len(times) - len(timed)),
        "peak_mem_mb": (peak - base) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
        "scan_backend": model.resolved_scan_backend(dev),
    }


def _worker(queue: Any, kwargs: dict[str, Any]) -> None:
    try:
        queue.put(("ok", _measure(**kwargs)))
    except Exception as e:  # report, let the parent record it and go on
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_point(kwargs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, kwargs))
    proc.start()
    try:
        status, value = queue.get(timeout=timeout_s)
    except Exception:
        proc.kill()
        proc.join()
        return {
            "mixer": kwargs["arch"]["mixer"],
            "size": kwargs["size"],
            "error": f"timed out after {timeout_s}s",
        }
    proc.join()
    if status != "ok":
        return {"mixer": kwargs["arch"]["mixer"], "size": kwargs["size"], "error": value}
    return value


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vmddpm.io import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mixer, marker in (("csm", "o"), ("attention", "s")):
        pts = sorted(
            (p for p in points if p["mixer"] == mixer and "error" not in p), key=lambda p: p["pixels"]
        )
        if not pts:
            continue
        xs, ys = [p["pixels"] for p in pts], [p["step_s_median"] for p in pts]
        ax.loglog(xs, ys, marker=marker, label=f"{mixer} (measured)")
        for power, style in ((1, ":"), (2, "--")):
            ax.loglog(xs, [ys[0] * (x / xs[0]) ** power for x in xs], style, color="grey", lw=0.8)
    ax.set_xlabel("pixels (H x W)")
    ax.set_ylabel("train step time (s)")
    ax.set_title(
        "VM-DDPM train step: CSM vs attention\n(grey: linear ':' and quadratic '--' from the first point)",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--scale", default="demo", help="architecture of this scale (fixed small width: demo)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--mixers", nargs="+", default=["csm", "attention"], choices=["csm", "attention"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop timing a point after this long")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="give up on a point after this long")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: <paths.results>/benchmarks/scaling.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from vmddpm.config import load_config
    from vmddpm.io import write_json

    cfg = load_config(args.params, scale=args.scale, overrides=args.overrides)
    base = dataclasses.asdict(cfg.model_config("vmddpm"))
    out = args.out or cfg.results_dir("benchmarks", "scaling.json")
    load_before = os.getloadavg()
    points = []
    for mixer in args.mixers:
        for size in args.sizes:
            arch = {**base, "mixer": mixer}
            kwargs = dict(
                arch=arch,
                size=size,
                batch=args.batch,
                warmup=args.warmup,
                repeats=args.repeats,
                budget_s=args.budget_s,
                device=args.device,
                threads=args.threads,
            )
            log.info("measuring mixer=%s size=%d ...", mixer, size)
            p = run_point(kwargs, args.timeout_s)
            log.info("  %s", {k: v for k, v in p.items() if k != "step_s_all"})
            points.append(p)

    growth: dict[str, dict[str, float]] = {}
    for mixer in args.mixers:
        by = {p["size"]: p for p in points if p["mixer"] == mixer and "error" not in p}
        g = {}
        for a, b in zip(sorted(by), sorted(by)[1:], strict=False):
            g[f"{b}/{a}"] = {
                "pixels_ratio": (b / a) ** 2,
                "time_ratio": by[b]["step_s_median"] / by[a]["step_s_median"],
                "mem_ratio": by[b]["peak_mem_mb"] / by[a]["peak_mem_mb"]
                if by[a]["peak_mem_mb"] > 0
                else None,
            }
        growth[mixer] = g
    import torch

    result = {
        "claim": "C5: cost linear in pixels for CSM (S6), quadratic for attention",
        "target": "csm time_ratio 256/128 <= 4.4 (linear); attention grows faster (quadratic -> ~16x)",
        "method": {
            "step": "forward + backward + AdamW step, MSE loss on random data",
            "time": f"median of {args.repeats} timed steps after {args.warmup} warm-up step(s); a point "
            f"stops once its steps exceed {args.budget_s}s in all (then fewer steps, and when only the "
            "warm-up ran, that one step is the measurement: see warmup_steps and step_s_all)",
            "memory": "CUDA: max_memory_allocated minus allocated before the steps"
            if args.device.startswith("cuda")
            else "CPU: peak RSS (VmHWM) minus RSS before the steps, each point in a fresh process",
        },
        "architecture": {k: v for k, v in base.items() if k != "mixer"},
        "batch": args.batch,
        "device": args.device,
        "threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "points": points,
        "growth": growth,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    plot(points, out.with_suffix(".png"))
    log.info("wrote %s and %s", out, out.with_suffix(".png"))
    for mixer, g in growth.items():
        for k, v in g.items():
            log.info(
                "%s %s: time x%.2f, memory x%s (pixels x%.0f)",
                mixer,
                k,
                v["time_ratio"],
                f"{v['mem_ratio']:.2f}" if v["mem_ratio"] else "n/a",
                v["pixels_ratio"],
            )
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
