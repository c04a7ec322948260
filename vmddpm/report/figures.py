"""The report's figures, drawn from data the report stage read (`vmddpm.report.inputs`).

Every figure with demo numbers says so in its title (`vmddpm.plotting.title`); the paper's value is
drawn only beside comparable numbers; every model keeps its colour across figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmddpm.config import Config
from vmddpm.contracts import SCALING_BENCHMARK, is_comparable
from vmddpm.plotting import model_colors, note, pyplot, save, title
from vmddpm.report.tables import NOT_RUN

DPI = 110


def _save(fig: Any, path: Path) -> Path:
    return save(fig, path, dpi=DPI, bbox_inches="tight")


def sample_figure(
    ds: str,
    rows: Sequence[tuple[str, Sequence[np.ndarray | None]]],
    path: Path,
    per_row: int,
    demo: bool,
) -> Path:
    """Real training images (the first row) above each model's first generated images: `rows` =
    [(label, images)], an image None when unreadable."""
    plt = pyplot()
    fig, axes = plt.subplots(
        len(rows),
        per_row,
        figsize=(per_row * 0.9 + 1.4, len(rows) * 0.95 + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for i, (label, images) in enumerate(rows):
        for j in range(per_row):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            img = images[j] if j < len(images) else None
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            elif j == 0:
                ax.text(0.0, 0.5, "no images", fontsize=7, color="0.4", transform=ax.transAxes)
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    title(fig, f"{ds}: real images (top) and samples of each model", demo)
    return _save(fig, path)


def lines_figure(
    cfg: Config,
    data: dict[tuple[str, str], list[tuple[float, float]]],
    path: Path,
    heading: str,
    xlabel: str,
    empty_note: str,
    demo: bool,
    logx: bool = False,
) -> Path:
    """FID against x, one panel per dataset, one line per model."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1,
        len(cfg.datasets),
        figsize=(4.2 * len(cfg.datasets) + 1.8, 3.8),
        squeeze=False,
        layout="constrained",
    )
    colors = model_colors(cfg.models)
    handles: dict[str, Any] = {}
    for ax, ds in zip(axes[0], cfg.datasets, strict=True):
        series = {m: pts for (d, m), pts in data.items() if d == ds and pts}
        ax.set_title(ds)
        if not series:
            note(ax, empty_note)
            continue
        for model in (m for m in cfg.models if m in series):
            xs, ys = zip(*sorted(series[model]), strict=True)
            (handles[model],) = ax.plot(xs, ys, marker="o", color=colors[model], label=model)
        if logx:
            ax.set_xscale("log")
            xt = sorted({x for pts in series.values() for x, _ in pts})
            ax.set_xticks(xt, [f"{x:g}" for x in xt])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
        if all(len(p) == 1 for p in series.values()):
            ax.text(0.02, 0.02, "one point per model so far", transform=ax.transAxes, fontsize=7, color="0.4")
    if handles:
        order = [m for m in cfg.models if m in handles]
        fig.legend([handles[m] for m in order], order, loc="outside right upper", fontsize=7)
    title(fig, heading, demo)
    return _save(fig, path)


def step_figure(
    cfg: Config, metrics: dict, history: dict[tuple[str, str], list[tuple[int, float]]], path: Path
) -> Path:
    """FID against training step: MLflow's evaluate runs (`history`), else each run's metrics.json at
    its checkpoint step."""
    data: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (ds, model), pts in history.items():
        if ds in cfg.datasets and model in cfg.models:
            data[(ds, model)] = [(float(s), v) for s, v in pts]
    for ds in cfg.datasets:  # runs without tracking: their own metrics.json, at their checkpoint step
        for model in cfg.models:
            m = metrics.get((ds, model))
            if (ds, model) not in data and m and isinstance(m.get("checkpoint_step"), int):
                data[(ds, model)] = [(float(m["checkpoint_step"]), float(m["fid"]))]
    demo = any(not is_comparable(m) for m in metrics.values())
    return lines_figure(
        cfg,
        data,
        path,
        "FID against training step",
        "training step",
        "no evaluation with a known training step yet:\nevery `vmddpm evaluate` adds a point "
        "(MLflow, step = checkpoint step);\ne.g. `dvc exp run -S scales.demo.train.steps=300`",
        demo,
    )


def ddim_figure(cfg: Config, sweeps: dict[tuple[str, str], dict[str, Any]], path: Path) -> Path:
    """FID against DDIM sampling steps, from each run's ddim_sweep.json."""
    data = {key: doc["points"] for key, doc in sweeps.items()}
    demo = any(bool(doc.get("label")) for doc in sweeps.values() if doc["points"])
    return lines_figure(
        cfg,
        data,
        path,
        f"FID against DDIM sampling steps (eval.ddim_steps_sweep = {cfg.eval.ddim_steps_sweep})",
        "DDIM steps",
        "no DDIM sweep run:\n`vmddpm sweep --dataset D --model M`",
        demo,
        logx=True,
    )


def scaling_figure(
    panels: Sequence[tuple[str, str, dict[str, list[tuple[float, float]]]]], source: Path, path: Path
) -> Path:
    """Time (and peak memory, when recorded) per training step against pixels, log-log; each curve's
    legend gives the log-log slope between its two largest sizes (1 = linear, 2 = quadratic).
    `panels` = [(what, y key, series)] with non-empty series."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    if not panels:
        note(
            axes[0],
            f"no usable scaling benchmark at\n{source}\n(run benchmarks/bench_scaling.py to write it)",
        )
    for ax, (what, yk, series) in zip(axes, panels, strict=False):
        for name, pts in sorted(series.items()):
            xs, ys = zip(*sorted(pts), strict=True)
            label = name
            if len(xs) > 1 and xs[-1] > xs[-2] and ys[-1] > 0 and ys[-2] > 0:
                slope = math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])
                label = f"{name}: slope {slope:.2f}"
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels")
        ax.set_ylabel(yk)
        ax.grid(alpha=0.3, which="both")
        ax.legend(
            fontsize=8, title="log-log slope of the last step\n(1 = linear, 2 = quadratic)", title_fontsize=7
        )
        ax.set_title(what, fontsize=9)
    fig.suptitle(
        f"Cost against image size (paper claim C5: linear for the CSM; {SCALING_BENCHMARK})", fontsize=10
    )
    return _save(fig, path)


def overview_figure(cfg: Config, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """FID of every model per dataset (bars); the paper's VM-DDPM value as a line only beside
    comparable numbers."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(cfg.datasets), figsize=(4.6 * len(cfg.datasets), 4.4), squeeze=False, layout="constrained"
    )
    demo = False
    for ax, ds in zip(axes[0], cfg.datasets, strict=True):
        mine = [r for r in rows if r["dataset"] == ds]
        ax.set_title(ds)
        xs = np.arange(len(mine))
        vals = [r["fid"] if r["fid"] is not None else 0.0 for r in mine]
        colors = ["tab:red" if r["model"] == "vmddpm" else "tab:blue" for r in mine]
        ax.bar(xs, vals, color=colors)
        for x, r in zip(xs, mine, strict=True):
            if r["fid"] is None:
                ax.text(x, 0, NOT_RUN, rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        ax.set_xticks(xs, [r["model"] for r in mine], rotation=70, fontsize=7)
        ax.set_ylabel("FID (ours)")
        done = [r for r in mine if r["fid"] is not None]
        demo |= any(not r["comparable_to_paper"] for r in done)
        paper = next((r["fid_paper"] for r in mine if r["model"] == "vmddpm"), None)
        if paper is not None and done and all(r["comparable_to_paper"] for r in done):
            ax.axhline(paper, ls="--", color="k", lw=1)
            ax.text(len(mine) - 0.5, paper, "paper VM-DDPM", ha="right", va="bottom", fontsize=7)
        elif paper is not None:
            text = "paper value not drawn:\nthese numbers are not comparable"
            ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=7, color="darkred")
    title(fig, "FID per dataset and model (lower is better)", demo)
    return _save(fig, path)
