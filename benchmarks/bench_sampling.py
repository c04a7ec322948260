"""DDIM-50 vs DDPM-1000: sampling wall-clock of the demo model on CPU (issue 5, target >= 18x).

Why: the paper's FIDs use DDPM ancestral sampling with T = 1000 network calls per image; DDIM with
50 steps is the fast sampler this project offers for demo runs and step sweeps. Both samplers run
the same network (`--model`, demo scale of params.yaml unless `--scale`/`--set`), the same batch of
per-image seeds, the same fixed call batch (`vmddpm.diffusion.Diffusion.sample`). The weights are
the trained EMA weights of `runs/<dataset>/<model>/train/model.pt` when it exists, otherwise a
seeded random initialisation (wall-clock does not depend on the weight values).

Method: one untimed warm-up call of the network, then the median of `--repeats` timed DDIM runs and
one timed DDPM run (1000 steps dominate the total). ratio = DDPM time / DDIM time; the ideal is
1000 / 50 = 20 (the scheduler's own work per step is the overhead that keeps it below).

Writes `results/benchmarks/sampling.json` atomically. Run from the repository root:
    .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vmddpm.config import load_config
from vmddpm.diffusion import Diffusion
from vmddpm.io import write_json

log = logging.getLogger("bench_sampling")
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--scale", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", default="vmddpm")
    p.add_argument("--dataset", default="acdc", help="whose trained weights to use if present")
    p.add_argument("--images", type=int, default=4, help="images per sampling run (one call batch)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="timed DDIM runs (median)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "sampling.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)

    from vmddpm.nn.registry import build_model, count_parameters

    cfg = load_config(args.params, scale=args.scale, overrides=args.overrides)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, args.model)
    weights = "random-init"
    final = cfg.train_dir(args.dataset, args.model) / "model.pt"
    if final.is_file():
        from vmddpm.checkpoint import load_checkpoint
        from vmddpm.nn.registry import model_signature

        net.load_state_dict(load_checkpoint(final, expect=model_signature(cfg, args.model))["ema"])
        weights = str(final.relative_to(cfg.root))
    net = net.eval()
    size = cfg.data.image_size
    diffusion = Diffusion(cfg.diffusion)
    seeds = list(range(args.images))

    def run(sampler: str, steps: int) -> float:
        t0 = time.perf_counter()
        diffusion.sample(
            net, (1, size, size), seeds, sampler, steps, 0.0, device="cpu", batch_size=args.images
        )
        return time.perf_counter() - t0

    with torch.no_grad():
        net(torch.zeros(args.images, 1, size, size), torch.zeros(args.images, dtype=torch.long))
    ddim = [run("ddim", args.ddim_steps) for _ in range(args.repeats)]
    log.info("DDIM-%d: %s s", args.ddim_steps, ", ".join(f"{t:.2f}" for t in ddim))
    ddpm = run("ddpm", args.ddpm_steps)
    log.info("DDPM-%d: %.2f s", args.ddpm_steps, ddpm)
    ddim_s = statistics.median(ddim)
    ratio = ddpm / ddim_s
    backend = getattr(net, "resolved_scan_backend", lambda d: "none")(torch.device("cpu"))
    result = {
        "benchmark": "sampling wall-clock, DDIM vs DDPM",
        "model": args.model,
        "scale": cfg.scale,
        "image_size": size,
        "images": args.images,
        "parameters": count_parameters(net),
        "weights": weights,
        "scan_backend": backend,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ddim_steps": args.ddim_steps,
        "ddpm_steps": args.ddpm_steps,
        "ddim_seconds": ddim,
        "ddim_seconds_median": ddim_s,
        "ddpm_seconds": ddpm,
        "ddim_images_per_s": args.images / ddim_s,
        "ddpm_images_per_s": args.images / ddpm,
        "ratio": ratio,
        "ideal_ratio": args.ddpm_steps / args.ddim_steps,
        "target_ratio": 18.0,
        "meets_target": ratio >= 18.0,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    write_json(args.out, result)
    log.info(
        "ratio DDPM-%d / DDIM-%d = %.1fx (target >= 18x): %s",
        args.ddpm_steps,
        args.ddim_steps,
        ratio,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
