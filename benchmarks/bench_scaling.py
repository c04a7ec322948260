"""Claim C5: VM-DDPM's cost grows linearly with the number of pixels, attention's quadratically.

Measures one training step (forward + backward + AdamW step, batch `--batch`) of the same VM-DDPM
network with `mixer: csm` (the paper's Cross-Scan Module, S6) and `mixer: attention` (multi-head
self-attention over the H*W tokens in its place) at `--sizes` (default 64, 128, 256), at a fixed
small width (the demo architecture of params.yaml unless `--set model.KEY=VALUE`).

Method (the measurement is `benchmarks/_measure.py`, shared with `bench_models.py`):
- time: median wall time of the timed steps after `--warmup` untimed steps (at least `--repeats`
  steps, fewer only when the steps so far exceed `--budget-s`), at a fixed `--threads`.
- memory: each (mixer, size) runs in a fresh process. On CUDA: `torch.cuda.max_memory_allocated`
  during the steps minus the allocation before them. On CPU: the process's peak resident set
  (VmHWM, reset before the steps) minus its resident set right before them: the extra memory a
  training step needs (activations, gradients, optimizer state), as the OS sees it (tracemalloc
  does not see torch's allocator). The numba S6 kernels are loaded before that baseline (one tiny
  forward + backward), so their one-off cost is not counted as the first step's.
- growth: the 256^2 / 128^2 ratio of each (4x the pixels): linear cost gives ~4x, quadratic ~16x.
  For the mixers of `--interleave` (csm), `time_ratio_interleaved` is the same ratio from steps of
  every size timed in rounds in one process, free of the machine's drift between points: the median
  over `--processes` such processes, which alternate between the variants (each process's own ratio
  in `time_ratio_interleaved_per_process`); beside the
  wall-time ratios, `user_cpu_ratio` (the compute alone) and the system time
  of each size (page faults: see `_measure.py`), so a ratio above 4 can be attributed.
- allocator: every point applies params.yaml's `cpu_memory` as `vmddpm train` does. On CPU with
  `retain` (the default), the mixers of `--compare-release` (csm) are measured again with `release`
  (glibc's default, which returns every block above 32 MiB to the kernel and faults it in again on
  the next step), as the variant "csm, cpu_memory=release": the cost of those page faults, side by side.

Writes `results/benchmarks/scaling.json` and `results/benchmarks/scaling.png` (log-log time and
peak memory vs pixels) atomically. Run from the repository root:
    .venv/bin/python benchmarks/bench_scaling.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

from _measure import (
    apply_cpu_memory,
    command_line,
    denoiser_step,
    interleaved_steps,
    loadavg,
    machine_info,
    measure_steps,
    method_record,
    prime_jit,
    run_point,
    set_threads,
)

log = logging.getLogger("bench_scaling")


def _model(arch: dict[str, Any], device: str) -> Any:
    """The VM-DDPM of `arch`, seeded, on `device`, its numba kernels loaded (see `prime_jit`)."""
    import torch

    from vmddpm.nn.vmunet import VMUNet

    torch.manual_seed(0)
    model = VMUNet(**arch).to(device)
    prime_jit(model, device)
    return model


def _point(
    arch: dict[str, Any],
    size: int,
    batch: int,
    warmup: int,
    repeats: int,
    budget_s: float,
    device: str,
    threads: int,
    cpu_memory: str,
) -> dict[str, Any]:
    """One (mixer, size) point; `_measure.run_point` runs it in its own process."""
    set_threads(threads)
    memory = apply_cpu_memory(cpu_memory, device)
    import torch

    model = _model(arch, device)
    result = measure_steps(denoiser_step(model, batch, size, device), device, warmup, repeats, budget_s)
    return {
        "pixels": size * size,
        "batch": batch,
        **result,
        "params": sum(p.numel() for p in model.parameters()),
        "scan_backend": model.resolved_scan_backend(torch.device(device)),
        **memory,
    }


def _interleaved(
    arch: dict[str, Any],
    sizes: list[int],
    batch: int,
    warmup: int,
    rounds: int,
    budget_s: float,
    device: str,
    threads: int,
    cpu_memory: str,
) -> dict[str, Any]:
    """Step times of one mixer at every size, timed in rounds in one process (for the ratios)."""
    set_threads(threads)
    memory = apply_cpu_memory(cpu_memory, device)
    steps = {str(size): denoiser_step(_model(arch, device), batch, size, device) for size in sizes}
    load_before = loadavg()
    result: dict[str, Any] = {"sizes": interleaved_steps(steps, warmup, rounds, budget_s)}
    return {**result, **memory, "loadavg_before": load_before, "loadavg_after": loadavg()}


def plot(
    points: list[dict[str, Any]],
    variants: list[str],
    path: Path,
    subtitle: str = "",
    growth: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> None:
    """Two log-log panels against pixels: step time and peak memory, one line per variant (mixer,
    or mixer with the other cpu_memory policy); each legend
    gives the growth between the two largest sizes (for step time also the interleaved, drift-free
    ratio where `growth` has one); thin lines: linear (dotted) and quadratic (dashed) growth from
    each series' first point."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from vmddpm.plotting import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4))
    panels = (
        ("step_s_median", "train step time (s)", "{:.3g} s"),
        ("peak_mem_mb", "peak memory (MiB)", "{:.0f}"),
    )
    sizes: set[int] = set()
    for ax, (key, ylabel, fmt) in zip(axes, panels, strict=True):
        for i, variant in enumerate(variants):
            marker, color = "osd^v"[i % 5], f"C{i}"
            pts = sorted(
                (p for p in points if p["variant"] == variant and (p.get(key) or 0) > 0),
                key=lambda p: p["pixels"],
            )
            if not pts:
                continue
            sizes.update(p["size"] for p in pts)
            xs, ys = [p["pixels"] for p in pts], [p[key] for p in pts]
            label = variant
            if len(pts) > 1:
                label += f": x{ys[-1] / ys[-2]:.2f} for x{xs[-1] / xs[-2]:.0f} pixels"
                pair = (growth or {}).get(variant, {}).get(f"{pts[-1]['size']}/{pts[-2]['size']}", {})
                if key == "step_s_median" and "time_ratio_interleaved" in pair:
                    n = len(pair.get("time_ratio_interleaved_per_process", [])) or 1
                    label += f" (x{pair['time_ratio_interleaved']:.2f} interleaved, median of {n})"
            ax.loglog(xs, ys, marker=marker, color=color, label=label)
            below = "cpu_memory=" in variant  # a comparison variant lies close to its mixer: label below
            for j, (x, y) in enumerate(zip(xs, ys, strict=True)):
                last = j == len(xs) - 1  # the last label goes left, inside the axes
                ax.annotate(
                    fmt.format(y),
                    (x, y),
                    textcoords="offset points",
                    xytext=((-6, -10) if below else (-6, 4)) if last else ((6, 4) if below else (6, -10)),
                    ha="right" if last else "left",
                    fontsize=7,
                )
            for power, style in ((1, ":"), (2, "--")):
                ref = [ys[0] * (x / xs[0]) ** power for x in xs]
                ax.loglog(xs, ref, style, color=color, lw=0.8, alpha=0.6)
            failed = [p["size"] for p in points if p["variant"] == variant and "error" in p]
            if failed:
                ax.plot([], [], " ", label=f"{variant} failed at " + ", ".join(f"{s}²" for s in failed))
        ax.set_xlabel("image size (pixels, log scale)")
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(which="major", alpha=0.3)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (hi / lo) ** 0.25)  # head room: the legend sits above the data
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes:
        ticks = sorted(sizes)
        ax.set_xticks([s * s for s in ticks], [f"{s}²" for s in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(
        "VM-DDPM train step: CSM (S6) vs attention"
        + (f" ({subtitle})" if subtitle else "")
        + "\nthin lines from each first point: dotted = linear, dashed = quadratic in pixels",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, path, dpi=120, format="png")


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
    parser.add_argument(
        "--interleave",
        nargs="*",
        default=["csm"],
        choices=["csm", "attention"],
        help="mixers whose growth ratios also come from steps of all sizes timed in rounds in one "
        "process (drift-free); attention at 256^2 takes minutes a step, so not by default",
    )
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of --interleave per process")
    parser.add_argument(
        "--processes",
        type=int,
        default=3,
        help="fresh processes per --interleave variant, alternating between variants; the ratio is the "
        "median of theirs",
    )
    parser.add_argument(
        "--compare-release",
        nargs="*",
        default=["csm"],
        choices=["csm", "attention"],
        help="on CPU with params.yaml cpu_memory=retain, also measure these mixers with "
        "cpu_memory=release (glibc's default), side by side",
    )
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: <paths.results>/benchmarks/scaling.json"
    )
    parser.add_argument(
        "--replot", action="store_true", help="redraw the figure from the JSON at --out; measure nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from vmddpm.config import load_config
    from vmddpm.io import write_json

    cfg = load_config(args.params, scale=args.scale, overrides=args.overrides)
    base = dataclasses.asdict(cfg.model_config("vmddpm"))
    out = args.out or cfg.results_dir("benchmarks", "scaling.json")
    if args.replot:
        if not out.is_file():
            parser.error(f"{out}: no results to redraw; run without --replot first (or pass --out)")
        done = json.loads(out.read_text())
        variants = list(dict.fromkeys(p["variant"] for p in done["points"]))
        subtitle = _subtitle(done["batch"], done["device"], done["threads"], done["cpu_memory"])
        plot(done["points"], variants, out.with_suffix(".png"), subtitle, done["growth"])
        log.info("redrew %s from %s", out.with_suffix(".png"), out)
        return 0
    load_before = loadavg()
    # (name, mixer, cpu_memory policy): the params.yaml policy for every mixer, and right after it the
    # other one for the mixers of --compare-release, to show what the policy is worth
    variants = []
    for m in args.mixers:
        variants.append((m, m, cfg.cpu_memory))
        if args.device == "cpu" and cfg.cpu_memory == "retain" and m in args.compare_release:
            variants.append((f"{m}, cpu_memory=release", m, "release"))
    points = []
    for size in args.sizes:  # the variants of a size one after the other: the least drift between them
        for variant, mixer, policy in variants:
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
                cpu_memory=policy,
            )
            log.info("measuring %s size=%d ...", variant, size)
            p = run_point(_point, kwargs, args.timeout_s, {"variant": variant, "mixer": mixer, "size": size})
            log.info("  %s", {k: v for k, v in p.items() if k != "step_s_all"})
            points.append(p)

    # one list of runs per variant; the processes alternate between variants (a, b, a, b, ...) so the
    # machine's drift over minutes reaches every variant alike
    interleaved: dict[str, list[dict[str, Any]]] = {}
    timed = [v for v in variants if v[1] in args.interleave]
    for (variant, mixer, policy), rep in [(v, r) for r in range(args.processes) for v in timed]:
        log.info(
            "timing %s at %s in %d interleaved rounds (process %d of %d) ...",
            variant,
            args.sizes,
            args.rounds,
            rep + 1,
            args.processes,
        )
        kwargs = dict(
            arch={**base, "mixer": mixer},
            sizes=args.sizes,
            batch=args.batch,
            warmup=args.warmup,
            rounds=args.rounds,
            budget_s=args.budget_s * len(args.sizes),
            device=args.device,
            threads=args.threads,
            cpu_memory=policy,
        )
        run = run_point(_interleaved, kwargs, args.timeout_s, {"mixer": mixer})
        log.info("  %s", run)
        interleaved.setdefault(variant, []).append(run)

    growth: dict[str, dict[str, float]] = {}
    for variant, _, _ in variants:
        by = {p["size"]: p for p in points if p["variant"] == variant and "error" not in p}
        runs = [r["sizes"] for r in interleaved.get(variant, []) if "error" not in r]
        g = {}
        for a, b in zip(sorted(by), sorted(by)[1:], strict=False):
            g[f"{b}/{a}"] = {
                "pixels_ratio": (b / a) ** 2,
                "time_ratio": by[b]["step_s_median"] / by[a]["step_s_median"],
                "mem_ratio": by[b]["peak_mem_mb"] / by[a]["peak_mem_mb"]
                if by[a]["peak_mem_mb"] > 0
                else None,
                # diagnostics: the compute alone (user CPU) and the kernel's page-fault work (sys)
                "user_cpu_ratio": by[b]["user_s_median"] / by[a]["user_s_median"],
                "sys_s": [by[a]["sys_s_median"], by[b]["sys_s_median"]],
            }
            pairs = [(r[str(a)], r[str(b)]) for r in runs if str(a) in r and str(b) in r]
            if pairs:  # the drift-free ratio: one per process, and their median
                wall = [pb["step_s_median"] / pa["step_s_median"] for pa, pb in pairs]
                user = [pb["user_s_median"] / pa["user_s_median"] for pa, pb in pairs]
                g[f"{b}/{a}"].update(
                    time_ratio_interleaved=statistics.median(wall),
                    time_ratio_interleaved_per_process=wall,
                    user_cpu_ratio_interleaved=statistics.median(user),
                )
        growth[variant] = g

    result = {
        "claim": "C5: cost linear in pixels for CSM (S6), quadratic for attention",
        "target": "csm 256/128 step-time ratio <= 4.4 (linear; time_ratio_interleaved is the drift-free "
        "measurement of it); attention grows faster (quadratic -> ~16x)",
        "cpu_memory": cfg.cpu_memory,
        "method": method_record(
            "forward + backward + AdamW step, MSE loss on random data",
            args.warmup,
            args.repeats,
            args.budget_s,
            args.timeout_s,
            args.device,
        ),
        "command": command_line(),
        "architecture": {k: v for k, v in base.items() if k != "mixer"},
        "batch": args.batch,
        "device": args.device,
        "threads": args.threads,
        "machine": {
            **machine_info(args.threads, args.device),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "points": points,
        "interleaved": interleaved,
        "growth": growth,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    subtitle = _subtitle(args.batch, args.device, args.threads, cfg.cpu_memory)
    plot(points, [v[0] for v in variants], out.with_suffix(".png"), subtitle, growth)
    log.info("wrote %s and %s", out, out.with_suffix(".png"))
    for variant, g in growth.items():
        for k, v in g.items():
            log.info(
                "%s %s: time x%.2f (interleaved x%s; user CPU x%.2f, sys %.2f -> %.2f s), memory x%s "
                "(pixels x%.0f)",
                variant,
                k,
                v["time_ratio"],
                f"{v['time_ratio_interleaved']:.2f}" if "time_ratio_interleaved" in v else "n/a",
                v["user_cpu_ratio"],
                *v["sys_s"],
                f"{v['mem_ratio']:.2f}" if v["mem_ratio"] else "n/a",
                v["pixels_ratio"],
            )
    return 0


def _subtitle(batch: int, device: str, threads: int, cpu_memory: str) -> str:
    where = f"CPU, {threads} threads, cpu_memory={cpu_memory}" if device == "cpu" else device
    return f"batch {batch}, {where}"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
