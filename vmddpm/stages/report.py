"""`vmddpm report`: paper-vs-ours tables and figures from every run of the matrix.

It reads only what the pipeline wrote (`vmddpm.report.inputs`; the MLflow store is the one input outside
the DAG, by design) and never recomputes a number, so it runs in seconds and can be rerun after any
subset of evaluations. Tables: `results/tables/main.{md,csv,html}`, `ablation.{md,csv,html}`,
`summary.json` (numbers only: DVC metrics) and `claims.json` (what they mean); figures:
`results/figures/*.png`. Demo numbers are labelled as such everywhere
(`vmddpm.contracts.is_comparable`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from vmddpm import io as vio
from vmddpm.config import Config
from vmddpm.contracts import SCALING_BENCHMARK, SCALING_MEMORY, SCALING_TIME, is_comparable
from vmddpm.report import figures, inputs, tables

log = logging.getLogger(__name__)

SAMPLES_PER_ROW = 8


def report(cfg: Config) -> Path:
    """Tables (CSV, Markdown, HTML), summary.json, claims.json and figures; returns the tables folder. One
    process at a time (`results/.tables.lock`); the folders are checked writable before anything is read."""
    with vio.output_lock(cfg.results_dir("tables"), "report"):
        vio.ensure_writable(cfg.results_dir("tables"), cfg.results_dir("figures"))
        return _report(cfg)


def _report(cfg: Config) -> Path:
    reference = inputs.read_reference(cfg)
    metrics, missing = inputs.read_metrics(cfg)
    out, figs = cfg.results_dir("tables"), cfg.results_dir("figures")
    rows = tables.main_rows(cfg, metrics, reference)
    abl = tables.ablation_rows(cfg, metrics, reference)
    cl = tables.claims(cfg, metrics, reference)
    vio.write_text(out / "main.csv", tables.to_csv(rows, tables.MAIN_COLUMNS))
    vio.write_text(out / "main.md", tables.main_markdown(rows, cl, reference))
    vio.write_text(out / "main.html", tables.main_html(rows, cl, reference))
    vio.write_text(out / "ablation.csv", tables.to_csv(abl, tables.ABLATION_COLUMNS))
    vio.write_text(out / "ablation.md", tables.ablation_markdown(cfg, abl))
    vio.write_text(out / "ablation.html", tables.ablation_html(cfg, abl))
    vio.write_json(out / "summary.json", tables.summary(rows))
    vio.write_json(out / "claims.json", tables.claims_doc(cfg, rows, missing, cl))

    written = [figures.overview_figure(cfg, rows, figs / "fid_overview.png")]
    for ds in cfg.datasets:
        written.append(_sample_figure(cfg, ds, metrics, figs / f"samples_{ds}.png"))
    history = inputs.mlflow_fid_history(cfg)
    evals = inputs.eval_histories(cfg)
    written.append(figures.step_figure(cfg, metrics, history, figs / "fid_vs_train_step.png", evals))
    if cfg.scale == "showcase":
        written += _showcase_figures(cfg, evals, figs)
    written.append(figures.ddim_figure(cfg, inputs.read_sweeps(cfg), figs / "fid_vs_ddim_steps.png"))
    doc = inputs.read_scaling(cfg)
    panels = [
        (what, key, series)
        for what, key in (("time", SCALING_TIME), ("memory", SCALING_MEMORY))
        if (series := inputs.scaling_series(doc, key))
    ]
    scaling = figures.scaling_figure(panels, SCALING_BENCHMARK, figs / "scaling.png")
    if scaling is None:  # no placeholder: the figure exists only with data behind it
        (figs / "scaling.png").unlink(missing_ok=True)
        log.warning(
            "%s: no usable scaling benchmark; no scaling figure (benchmarks/bench_scaling.py writes it)",
            inputs.scaling_path(cfg),
        )
    else:
        written.append(scaling)
    log.info(
        "report: %d of %d runs evaluated; tables in %s, %d figures in %s",
        len(metrics),
        len(cfg.datasets) * len(cfg.models),
        out,
        len(written),
        figs,
    )
    return out


def _showcase_figures(cfg: Config, evals: dict, figs: Path) -> list[Path]:
    """The showcase's two figures: samples at several training steps beside real images, and FID/KID
    against training step (both from the train folders' evaluations during training)."""
    n = SAMPLES_PER_ROW
    real = [inputs.read_gray(f) for ds in cfg.datasets for f in inputs.real_files(cfg, ds)[:n]][:n]
    grids = {
        (ds, model, int(r["step"])): inputs.eval_grid(cfg, ds, model, int(r["step"]), n)
        for (ds, model), rows in evals.items()
        for r in rows
    }
    finals = {}
    for ds in cfg.datasets:
        for model in cfg.models:
            files = inputs.sample_files(cfg, ds, model, n)
            if files:
                sc = cfg.sample
                what = f"final samples ({sc.sampler.upper()}-{sc.steps}, step {cfg.train.steps})"
                finals[(ds, model)] = (what, [inputs.read_gray(f) for f in files])
    return [
        figures.showcase_samples_figure(cfg, real, evals, grids, finals, figs / "showcase_samples.png", n),
        figures.showcase_fid_figure(cfg, evals, figs / "showcase_fid.png"),
    ]


def _sample_figure(cfg: Config, ds: str, metrics: dict, path: Path) -> Path:
    n = SAMPLES_PER_ROW
    rows = [("real (train)", [inputs.read_gray(f) for f in inputs.real_files(cfg, ds)[:n]])]
    for model in cfg.models:
        m = metrics.get((ds, model))
        label = model + (f"\nFID {m['fid']:.3g}" if m else "\nnot run")
        rows.append((label, [inputs.read_gray(f) for f in inputs.sample_files(cfg, ds, model, n)]))
    demo = any(not is_comparable(m) for (d, _), m in metrics.items() if d == ds)
    return figures.sample_figure(ds, rows, path, n, demo, demo_label=figures.scale_label(cfg))
