"""DDIM-50 vs DDPM-1000: sampling wall-clock of the demo model on CPU (issue 5, target >= 18x).

Why: the paper's FIDs use DDPM ancestral sampling with T = 1000 network calls per image; DDIM with
50 steps is the fast sampler this project offers for demo runs and step sweeps. Both samplers run
the same network (`--model`, demo scale of params.yaml unless `--scale`/`--set`), the same batch of
per-image seeds, the same fixed call batch (`vmddpm.diffusion.Diffusion.sample`). The weights are
the trained EMA weights of `runs/<dataset>/<model>/train/model.pt` when it exists, otherwise a
seeded random initialisation (wall-clock does not depend on the weight values).

Method: one untimed warm-up call of the network (numba compiles the scan kernel there), then
`--repeats` timed DDIM runs interleaved with `--ddpm-repeats` timed DDPM runs (DDIM, DDPM, DDIM,
DDPM, DDIM by default), in one process at a fixed `--threads`: on a shared machine the speed drifts
by tens of percent over minutes, and interleaving spreads that drift over both samplers instead of
biasing the ratio one way. ratio = median DDPM time / median DDIM time (`ratio_min`: the same from
the fastest runs); the ideal is 1000 / 50 = 20 (the scheduler's own work per step keeps it below;
a ratio above 20 means the machine's speed changed between runs). The JSON records the load
average before and after, the thread count, cpu_count and each run's CPU seconds per wall second
(about the thread count when the process had the cores to itself).

Writes `results/benchmarks/sampling.json` atomically. Run from the repository root:
    .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from _measure import command_line, loadavg, machine_info, set_threads

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
    p.add_argument("--ddpm-repeats", type=int, default=2, help="timed DDPM runs (median)")
    p.add_argument("--threads", type=int, default=2, help="torch (and numba) CPU threads")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "sampling.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_threads(args.threads)

    from vmddpm.nn.registry import build_model, count_parameters

    cfg = load_config(args.params, scale=args.scale, overrides=args.overrides)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, args.model)
    weights = "random-init"
    final = cfg.train_dir(args.dataset, args.model) / "model.pt"
    if final.is_file():
        from vmddpm.errors import UserError
        from vmddpm.nn.registry import model_signature
        from vmddpm.trainkit import load_checkpoint

        try:  # a stale checkpoint (another architecture) must not stop a wall-clock benchmark
            state = load_checkpoint(final, expect=model_signature(cfg, args.model))
            net.load_state_dict(state["ema"])
            weights = str(final.relative_to(cfg.root))
        except UserError as e:
            log.warning("using random weights: %s", e)
            weights = f"random-init ({final.relative_to(cfg.root)} does not match: stale checkpoint)"
    net = net.eval()
    size = cfg.data.image_size
    diffusion = Diffusion(cfg.diffusion)
    seeds = list(range(args.images))

    cpu_share: dict[str, list[float]] = {"ddim": [], "ddpm": []}

    def run(sampler: str, steps: int) -> float:
        c0, t0 = time.process_time(), time.perf_counter()
        diffusion.sample(
            net, (1, size, size), seeds, sampler, steps, 0.0, device="cpu", batch_size=args.images
        )
        wall = time.perf_counter() - t0
        cpu_share[sampler].append((time.process_time() - c0) / wall)
        return wall

    load_before = loadavg()
    with torch.no_grad():
        net(torch.zeros(args.images, 1, size, size), torch.zeros(args.images, dtype=torch.long))
    # the DDIM runs spread as evenly as possible over the gaps before, between and after the DDPM runs
    gaps = args.ddpm_repeats + 1
    per_gap = [args.repeats // gaps + (i < args.repeats % gaps) for i in range(gaps)]
    order: list[str] = []
    for i, n in enumerate(per_gap):
        order += ["ddim"] * n + (["ddpm"] if i < args.ddpm_repeats else [])
    times: dict[str, list[float]] = {"ddim": [], "ddpm": []}
    for sampler in order:
        steps = args.ddim_steps if sampler == "ddim" else args.ddpm_steps
        times[sampler].append(run(sampler, steps))
        log.info("%s-%d: %.2f s", sampler.upper(), steps, times[sampler][-1])
    ddim, ddpm_all = times["ddim"], times["ddpm"]
    ddpm = statistics.median(ddpm_all)
    load_after = loadavg()
    ddim_s = statistics.median(ddim)
    ratio = ddpm / ddim_s
    ratio_min = min(ddpm_all) / min(ddim)
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
        "machine": {
            **machine_info(args.threads, "cpu"),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "order": order,
        "cpu_s_per_wall_s": cpu_share,  # ~threads when the process had the cores to itself
        "ddim_steps": args.ddim_steps,
        "ddpm_steps": args.ddpm_steps,
        "ddim_seconds": ddim,
        "ddim_seconds_median": ddim_s,
        "ddpm_seconds": ddpm_all,
        "ddpm_seconds_median": ddpm,
        "ddim_images_per_s": args.images / ddim_s,
        "ddpm_images_per_s": args.images / ddpm,
        "ratio": ratio,
        "ratio_min": ratio_min,
        "ideal_ratio": args.ddpm_steps / args.ddim_steps,
        "target_ratio": 18.0,
        "meets_target": ratio >= 18.0,
        "command": command_line(),
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
