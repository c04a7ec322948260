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
from vmddpm.contracts import DEMO_LABEL, is_comparable
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
    demo_label: str = DEMO_LABEL,
    full_title: bool = False,
) -> Path:
    """Real training images (the first row) above each model's first generated images: `rows` =
    [(label, images)], an image None when unreadable. `ds` is the dataset (or, with `full_title`, the
    whole heading)."""
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
    title(fig, ds if full_title else f"{ds}: real images (top) and samples of each model", demo, demo_label)
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
    label: str | None = None,
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
        xt = sorted({x for pts in series.values() for x, _ in pts})
        if logx:
            ax.set_xscale("log")
            ax.set_xticks(xt, [f"{x:g}" for x in xt])
            ax.minorticks_off()
        else:  # from 0 to the last point, ticks at the x values that exist (one step: not a 19-21 axis)
            ax.set_xlim(0, max(xt) * 1.08 if max(xt) > 0 else 1)
            if len(xt) <= 8:
                ax.set_xticks(sorted({0.0, *xt}), [f"{x:g}" for x in sorted({0.0, *xt})])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
        if len(xt) == 1:
            ax.text(
                0.02,
                0.02,
                f"one evaluation per model so far, at {xlabel} {xt[0]:g}",
                transform=ax.transAxes,
                fontsize=7,
                color="0.4",
            )
    if handles:
        order = [m for m in cfg.models if m in handles]
        fig.legend([handles[m] for m in order], order, loc="outside right upper", fontsize=7)
    title(fig, heading, demo, *([label] if label else []))
    return _save(fig, path)


def scale_label(cfg: Config) -> str:
    """What a figure of this scale says when its numbers are not comparable to the paper."""
    if cfg.scale != "showcase":
        return DEMO_LABEL
    size = cfg.data.image_size
    phantoms = all(cfg.dataset(ds).source == "phantom" for ds in cfg.datasets)
    kind = cfg.diffusion.prediction_type.replace("_", "-")
    what = [kind, f"{size}²", "phantoms" if phantoms else "real data"]
    return f"showcase (not comparable to the paper; {', '.join(what)})"


def step_figure(
    cfg: Config,
    metrics: dict,
    history: dict[tuple[str, str], list[tuple[int, float]]],
    path: Path,
    evals: dict[tuple[str, str], list[dict[str, float]]] | None = None,
) -> Path:
    """FID against training step: each run's evaluations during training (`evals`, its
    eval_history.csv), else MLflow's evaluate runs of this scale (`history`), else each run's
    metrics.json at its checkpoint step. One source per run: the points of one line were measured
    alike."""
    data: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (ds, model), rows in (evals or {}).items():
        if ds in cfg.datasets and model in cfg.models:
            data[(ds, model)] = [(float(r["step"]), float(r["fid"])) for r in rows]
    for (ds, model), pts in history.items():
        if ds in cfg.datasets and model in cfg.models and (ds, model) not in data:
            data[(ds, model)] = [(float(s), v) for s, v in pts]
    for ds in cfg.datasets:  # runs without tracking: their own metrics.json, at their checkpoint step
        for model in cfg.models:
            m = metrics.get((ds, model))
            if (ds, model) not in data and m and isinstance(m.get("checkpoint_step"), int):
                data[(ds, model)] = [(float(m["checkpoint_step"]), float(m["fid"]))]
    demo = any(not is_comparable(m) for m in metrics.values()) or cfg.scale == "showcase"
    tc = cfg.train
    heading = "FID against training step"
    if evals:
        heading += f"\nduring training: {tc.eval_images} samples, DDIM-{tc.eval_steps}"
    return lines_figure(
        cfg,
        data,
        path,
        heading,
        "training step",
        "no evaluation with a known training step yet:\n`train.eval_every` evaluates during training; "
        "every `vmddpm evaluate` adds a point too\n(MLflow, step = checkpoint step)",
        demo,
        label=scale_label(cfg),
    )


SHOWCASE_STEPS = 6
"""Training steps shown per model in the showcase's sample figure (first and last included)."""


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """`k` items spread evenly over `items`, first and last included."""
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def showcase_samples_figure(
    cfg: Config,
    real: Sequence[np.ndarray | None],
    evals: dict[tuple[str, str], list[dict[str, float]]],
    grids: dict[tuple[str, str, int], np.ndarray | None],
    finals: dict[tuple[str, str], tuple[str, Sequence[np.ndarray | None]]],
    path: Path,
    per_row: int = 8,
) -> Path:
    """Real images above each model's samples at several training steps (the fixed-seed evaluation
    samples, so a column is one seed throughout) and its final samples (the sample stage)."""
    rows: list[tuple[str, Sequence[np.ndarray | None]]] = [("real (train)", list(real))]
    for ds in cfg.datasets:
        for model in cfg.models:
            for r in _spread(evals.get((ds, model), []), SHOWCASE_STEPS):
                imgs = grids.get((ds, model, int(r["step"])))
                name = f"{model}\nstep {int(r['step'])}, FID {r['fid']:.3g}"
                rows.append((name, [] if imgs is None else list(imgs)))
            if (ds, model) in finals:
                what, imgs = finals[(ds, model)]
                rows.append((f"{model}\n{what}", imgs))
    heading = (
        f"{', '.join(cfg.datasets)}: real images (top) and samples during training "
        "(same seeds per column) and after it"
    )
    return sample_figure(heading, rows, path, per_row, True, demo_label=scale_label(cfg), full_title=True)


def showcase_fid_figure(
    cfg: Config, evals: dict[tuple[str, str], list[dict[str, float]]], path: Path
) -> Path:
    """FID and KID against training step for every model of the showcase (its evaluations during
    training); the legend gives each model's final/step-0 FID ratio."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    colors = model_colors(cfg.models)
    for (ds, model), rows in sorted(evals.items()):
        if ds not in cfg.datasets or model not in cfg.models or not rows:
            continue
        xs = [r["step"] for r in rows]
        ratio = rows[-1]["fid"] / rows[0]["fid"] if rows[0]["fid"] else float("nan")
        name = f"{model} ({ds}): final/step-0 FID {ratio:.2f}"
        axes[0].plot(xs, [r["fid"] for r in rows], marker="o", color=colors[model], label=name)
        axes[1].plot(xs, [r["kid_mean"] for r in rows], marker="o", color=colors[model], label=model)
    for ax, what in zip(axes, ("FID", "KID"), strict=True):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{what} (random-inception)" if cfg.eval.extractor == "random-inception" else what)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            note(ax, "no evaluation during training (train.eval_every = 0)")
    tc = cfg.train
    title(
        fig,
        f"FID and KID against training step ({tc.eval_images} EMA samples, DDIM-{tc.eval_steps}, "
        f"every {tc.eval_every} steps; log scale)",
        True,
        scale_label(cfg),
    )
    return _save(fig, path)


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
        label=scale_label(cfg),
    )


SCALING_LABELS = {
    "step_s_median": "time per training step (s, median)",
    "peak_mem_mb": "peak memory of a training step (MB)",
}


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y against log x (1 = linear in pixels, 2 = quadratic)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def scaling_figure(
    panels: Sequence[tuple[str, str, dict[str, list[tuple[float, float]]]]], source: str, path: Path
) -> Path | None:
    """Time (and peak memory, when recorded) per training step against pixels, log-log, one line per
    variant of the benchmark (distinct markers and line styles, so variants measured at the same sizes
    stay visible); the legend gives each line's fitted log-log slope (1 = linear, 2 = quadratic) and
    grey guides show slopes 1 and 2. `panels` = [(what, y key, series)]; none -> no figure (None)."""
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), layout="constrained")
    axes = np.atleast_1d(axes)
    styles = [("o", "-", 2.0), ("s", "--", 1.4), ("^", ":", 1.4), ("D", "-.", 1.4)]
    for ax, (_what, yk, series) in zip(axes, panels, strict=True):
        xs_all = sorted({x for pts in series.values() for x, _ in pts})
        for i, (name, pts) in enumerate(sorted(series.items(), key=lambda kv: ("," in kv[0], kv[0]))):
            xs, ys = zip(*sorted(pts), strict=True)
            marker, ls, lw = styles[i % len(styles)]
            slope = _slope(xs, ys)
            label = name + (f": slope {slope:.2f}" if slope is not None else "")
            ax.plot(xs, ys, marker=marker, ls=ls, lw=lw, ms=7 - i, mfc="none" if i else None, label=label)
        lo = min(y for pts in series.values() for _, y in pts)
        for k, text in ((1, "slope 1"), (2, "slope 2")):  # guides through the smallest point
            x0 = xs_all[0]
            ax.plot(xs_all, [lo * (x / x0) ** k for x in xs_all], color="0.75", lw=0.8, zorder=0)
            ax.annotate(text, (xs_all[-1], lo * (xs_all[-1] / x0) ** k), fontsize=7, color="0.5")
        ax.set_xscale("log")
        ax.set_yscale("log")
        side = [math.isqrt(int(x)) for x in xs_all]
        ax.set_xticks(
            xs_all, [f"{s}×{s}" if s * s == int(x) else f"{x:g}" for s, x in zip(side, xs_all, strict=True)]
        )
        ax.minorticks_off()
        ax.set_xlabel("image size (pixels, log scale)")
        ax.set_ylabel(SCALING_LABELS.get(yk, yk) + ", log scale")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, title="fitted log-log slope", title_fontsize=7, loc="upper left")
    fig.suptitle(
        "Training-step cost against image size: CSM (S6 scan) against self-attention\n"
        f"paper claim C5: linear in pixels for the CSM (source: {source})",
        fontsize=10,
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
    title(fig, "FID per dataset and model (lower is better)", demo, scale_label(cfg))
    return _save(fig, path)
