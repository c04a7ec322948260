"""Train-step time and peak memory of every preset at 64² and 128² (demo widths), side by side.

Why one subprocess per (model, size): peak RSS (ru_maxrss) cannot be reset inside a process, so each
measurement gets a fresh interpreter; on CUDA, torch's peak-allocated counter is used instead.
Writes results/benchmarks/models.json and models.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def one(name: str, size: int, repeats: int) -> dict:
    """Median wall time of a full train step (forward, loss, backward, optimizer) of preset `name`."""
    from vmddpm.config import load_config
    from vmddpm.nn import registry

    cfg = load_config(ROOT / "params.yaml", scale="demo")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bs = cfg.train.batch_size
    x = torch.randn(bs, 1, size, size, device=dev)
    if cfg.preset(name).family == "gan":
        g, d = (m.to(dev) for m in registry.build_gan(cfg, name, size))
        params = list(g.parameters()) + list(d.parameters())
        z = torch.randn(bs, cfg.baselines.gan.z_dim, device=dev)

        def step() -> torch.Tensor:
            return d(g(z)).mean() - d(x).mean()
    else:
        net = registry.build_model(cfg, name, size).to(dev)
        params = list(net.parameters())
        t = torch.randint(0, cfg.diffusion.timesteps, (bs,), device=dev)

        def step() -> torch.Tensor:
            return torch.nn.functional.mse_loss(net(x, t), x)

    opt = torch.optim.Adam(params, lr=1e-4)
    times = []
    for i in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        step().backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:  # first step is warm-up
            times.append(time.perf_counter() - t0)
    times.sort()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "model": name,
        "image_size": size,
        "batch_size": bs,
        "params": sum(p.numel() for p in params),
        "step_s": times[len(times) // 2],
        "peak_mem_mb": peak,
        "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_max_rss",
        "device": str(dev),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "SIZE"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "models.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.repeats)))
        return
    from vmddpm.config import load_config
    from vmddpm.io import write_json

    cfg = load_config(ROOT / "params.yaml", scale="demo")
    rows = []
    for size in args.sizes:
        for name in cfg.presets:
            cmd = [sys.executable, __file__, "--one", name, str(size), "--repeats", str(args.repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"scale": "demo", "torch": torch.__version__, "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(cfg.presets)
    w = 0.8 / len(args.sizes)
    for k, size in enumerate(args.sizes):
        r = {row["model"]: row for row in rows if row["image_size"] == size}
        xs = [i + k * w for i in range(len(names))]
        axes[0].bar(xs, [r[n]["step_s"] for n in names], w, label=f"{size}²")
        axes[1].bar(xs, [r[n]["peak_mem_mb"] for n in names], w, label=f"{size}²")
    for ax, title in zip(axes, ["train step (s)", "peak memory (MiB)"], strict=True):
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, rotation=60, ha="right")
        ax.set_title(title + " — demo widths")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
