"""Train-step time and peak memory of every preset at 64^2 and 128^2 (demo widths), side by side.

Every preset of params.yaml `presets:` (the matrix's models plus `vmddpm_attention`) is built at the
widths of `--scale` (default demo: the narrow networks of `scales.demo`) and trained for a few steps
on random data at each of `--sizes`, batch `train.batch_size` of that scale (`--batch` to change):

- diffusion families (vmunet, unet_attn, dit): forward, MSE to the noise, backward, AdamW step;
- gan family (dcgan, wgan_gp): one discriminator update (wgan_gp: with its gradient penalty) and one
  generator update, Adam with `baselines.gan` lr/betas, as in `vmddpm.stages.gan` (which, for wgan_gp, does
  `n_critic` discriminator updates per generator update: not included here).

The measurement is `benchmarks/_measure.py`, shared with `bench_scaling.py`: each (model, size) in
a fresh process at a fixed `--threads`; time = median of `--repeats` timed steps after `--warmup`
(fewer once a point's steps exceed `--budget-s`); memory = peak resident set during the steps minus
the resident set before them on CPU (VmHWM reset first; numba's S6 kernels loaded before), CUDA
max_memory_allocated minus allocated before them on a GPU: the memory a training step needs, not
the interpreter, torch and the weights.

Writes `results/benchmarks/models.json` and `results/benchmarks/models.png` (two panels: step time,
peak memory; log scale) atomically. Run from the repository root:
    .venv/bin/python benchmarks/bench_models.py
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from _measure import (
    apply_cpu_memory,
    command_line,
    denoiser_step,
    loadavg,
    machine_info,
    measure_steps,
    method_record,
    prime_jit,
    run_point,
    set_threads,
)

log = logging.getLogger("bench_models")
ROOT = Path(__file__).resolve().parents[1]


def _gan_step(g: Any, d: Any, gan_loss: str, gc: Any, batch: int, size: int, device: str) -> Any:
    """One discriminator update and one generator update of a GAN preset, as `vmddpm.stages.gan` trains."""
    import torch

    from vmddpm.adversarial import discriminator_loss, generator_loss

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    real = (torch.rand(batch, 1, size, size, generator=gen) * 2 - 1).to(dev)
    z = torch.randn(batch, gc.z_dim, generator=gen).to(dev)
    betas = (gc.betas[0], gc.betas[1])
    opt_g = torch.optim.Adam(g.parameters(), lr=gc.lr, betas=betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=gc.lr, betas=betas)
    wgan = gan_loss == "wgan_gp"

    def step() -> None:
        with torch.no_grad():
            fake = g(z)
        loss_d = discriminator_loss(d, real, fake, wgan, gc.gp_weight, gen)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = generator_loss(d(g(z)), wgan)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step


def _point(
    params: str,
    scale: str,
    overrides: list[str],
    name: str,
    size: int,
    batch: int,
    warmup: int,
    repeats: int,
    budget_s: float,
    device: str,
    threads: int,
) -> dict[str, Any]:
    """One (model, size) point; `_measure.run_point` runs it in its own process."""
    set_threads(threads)
    import torch

    from vmddpm.config import load_config
    from vmddpm.nn import registry

    cfg = load_config(params, scale=scale, overrides=overrides)
    preset = cfg.preset(name)
    torch.manual_seed(0)
    extra: dict[str, Any] = apply_cpu_memory(cfg.cpu_memory, device)
    if preset.family == "gan":
        g, d = (m.to(device) for m in registry.build_gan(cfg, name, size))
        step = _gan_step(g, d, preset.gan_loss or "bce", cfg.baselines.gan, batch, size, device)
        n_g, n_d = registry.count_parameters(g), registry.count_parameters(d)
        extra = {"params": n_g + n_d, "params_generator": n_g, "params_discriminator": n_d}
    else:
        net = registry.build_model(cfg, name, size).to(device)
        if preset.family == "vmunet":
            extra["scan_backend"] = net.resolved_scan_backend(torch.device(device))
            prime_jit(net, device)
        step = denoiser_step(net, batch, size, device, timesteps=cfg.diffusion.timesteps)
        extra["params"] = registry.count_parameters(net)
    return {**extra, **measure_steps(step, device, warmup, repeats, budget_s)}


def plot(rows: list[dict[str, Any]], names: list[str], sizes: list[int], title: str, path: Path) -> None:
    """Two panels (step time, peak memory), one bar per (model, size), log scale, values on the bars."""
    from matplotlib.ticker import FuncFormatter

    from vmddpm.plotting import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(11, 8.5), sharex=True)
    w = 0.8 / len(sizes)
    panels = (
        ("step_s_median", "train step time (s)", "{:.3g}"),
        ("peak_mem_mb", "peak memory (MiB)", "{:.0f}"),
    )
    for ax, (key, label, fmt) in zip(axes, panels, strict=True):
        for k, size in enumerate(sizes):
            by = {r["model"]: r for r in rows if r["image_size"] == size}
            legend = f"{size}×{size}"
            for i, name in enumerate(names):
                x = i - 0.4 + w * (k + 0.5)
                r = by.get(name, {})
                v = r.get(key)
                if v is None or v <= 0:
                    ax.text(
                        x,
                        0.02,
                        "failed" if "error" in r else "n/a",
                        transform=ax.get_xaxis_transform(),
                        ha="center",
                        va="bottom",
                        rotation=90,
                        fontsize=7,
                        color="red",
                    )
                    continue
                ax.bar(x, v, w, color=f"C{k}", label=legend)
                legend = None  # one legend entry per size
                ax.text(x, v * 1.08, fmt.format(v), ha="center", va="bottom", rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel(label)
        ymin, ymax = ax.get_ylim()
        ax.set_ylim(ymin, ymax * 4)  # room for the value labels
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[1].set_xticks(range(len(names)), names, rotation=35, ha="right")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, path, dpi=120, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--scale", default="demo", help="widths and batch of this scale")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--models", nargs="+", default=None, help="default: every preset of params.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=0, help="0 = train.batch_size of the scale")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop timing a point after this long")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="give up on a point after this long")
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    parser.add_argument("--threads", type=int, default=2, help="torch (and numba) CPU threads")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: <paths.results>/benchmarks/models.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from vmddpm.config import DEMO_LABEL, load_config
    from vmddpm.io import write_json

    cfg = load_config(args.params, scale=args.scale, overrides=args.overrides)
    names = args.models or list(cfg.presets)
    for name in names:
        cfg.preset(name)  # unknown names: a one-line error with the nearest preset, before any work
    batch = args.batch or cfg.train.batch_size
    out = args.out or cfg.results_dir("benchmarks", "models.json")
    load_before = loadavg()
    rows = []
    for size in args.sizes:
        for name in names:
            family = cfg.preset(name).family
            kwargs = dict(
                params=args.params,
                scale=args.scale,
                overrides=args.overrides,
                name=name,
                size=size,
                batch=batch,
                warmup=args.warmup,
                repeats=args.repeats,
                budget_s=args.budget_s,
                device=args.device,
                threads=args.threads,
            )
            log.info("measuring %s at %d^2 ...", name, size)
            label = {"model": name, "family": family, "image_size": size, "batch": batch}
            row = run_point(_point, kwargs, args.timeout_s, label)
            log.info("  %s", {k: v for k, v in row.items() if k not in ("step_s_all", "mem_method")})
            rows.append(row)

    result = {
        "benchmark": "train-step time and peak memory of every preset, side by side",
        "scale": cfg.scale,
        "cpu_memory": cfg.cpu_memory,
        "command": command_line(),
        "method": method_record(
            "diffusion families: forward + MSE to the noise + backward + AdamW step on random data; "
            "gan: one discriminator update (wgan_gp with gradient penalty) + one generator update "
            "(training does baselines.gan.n_critic discriminator updates per generator update for wgan_gp)",
            args.warmup,
            args.repeats,
            args.budget_s,
            args.timeout_s,
            args.device,
        ),
        "sizes": args.sizes,
        "batch": batch,
        "widths": {
            "model": dataclasses.asdict(cfg.model),
            "baselines": dataclasses.asdict(cfg.baselines),
            "presets": {n: dataclasses.asdict(cfg.preset(n)) for n in names},
        },
        "machine": {**machine_info(args.threads, args.device), "loadavg_before": load_before},
        "rows": rows,
    }
    result["machine"]["loadavg_after"] = loadavg()
    write_json(out, result)
    where = f"{args.device}, {args.threads} threads" if args.device == "cpu" else args.device
    title = (
        f"Train step of every preset at {cfg.scale} widths, batch {batch} ({where}); "
        f"{DEMO_LABEL if cfg.scale == 'demo' else cfg.scale}"
    )
    plot(rows, names, args.sizes, title, out.with_suffix(".png"))
    log.info("wrote %s and %s", out, out.with_suffix(".png"))
    for r in rows:
        log.info(
            "%-20s %4d^2 %9s params  %s",
            r["model"],
            r["image_size"],
            f"{r['params']:,}" if "params" in r else "?",
            f"{r['step_s_median']:.3f} s/step  {r['peak_mem_mb']:.0f} MiB"
            if "error" not in r
            else r["error"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
