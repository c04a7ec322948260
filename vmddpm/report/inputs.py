"""What the report reads: every file the pipeline declared for it, and the MLflow store.

Declared inputs (Snakemake rule / DVC stage `report`): each run's metrics.json and ddim_sweep.json, its
train folder (`eval_history.csv` and `eval/` grids: FID against training step), its samples (the sample
figure), the prepared manifests (real images for the sample figure), the paper's
numbers (`results/paper/reference.csv`, read, never written) and the scaling benchmark
(`results/benchmarks/scaling.json`, written by benchmarks/bench_scaling.py, format in
`vmddpm.contracts`). One input is outside the DAG by design: the MLflow store, whose evaluate runs of
earlier experiments (other `train.steps`) make the FID-against-training-step curve; a broken or absent
store leaves that figure with the points of the current metrics.json files.

Nothing here raises on a missing or unreadable run: it is logged and reported as "not run".
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vmddpm.config import Config
from vmddpm.contracts import (
    EVAL_GRIDS,
    EVAL_HISTORY,
    SCALING_BENCHMARK,
    SCALING_X,
    read_record,
    split_files,
)
from vmddpm.errors import UserError

log = logging.getLogger(__name__)


def reference_path(cfg: Config) -> Path:
    return cfg.results_dir("paper", "reference.csv")


def read_reference(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """(dataset, model) -> {value: float | None, source: str} for metric fid."""
    path = reference_path(cfg)
    if not path.is_file():
        raise UserError(
            f"{path}: the paper's reference numbers are missing; restore it from git (it is committed)"
        )
    out: dict[tuple[str, str], dict[str, Any]] = {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows, start=2):
        if not {"dataset", "model", "metric", "value", "source"} <= set(row):
            raise UserError(f"{path}: line {i} lacks the columns dataset, model, metric, value, source")
        if row["metric"] != "fid":
            continue
        raw = (row["value"] or "").strip()
        try:
            value = float(raw) if raw else None
        except ValueError:
            raise UserError(
                f"{path}: line {i}: value {raw!r} is not a number; leave it empty if unknown"
            ) from None
        out[(row["dataset"], row["model"])] = {"value": value, "source": row["source"]}
    return out


def read_metrics(cfg: Config) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str]]:
    """Every metrics.json (joined with its protocol.json) of the configured datasets x models; the missing
    ones as 'ds/model'."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    missing: list[str] = []
    for ds in cfg.datasets:
        for model in cfg.models:
            path = cfg.metrics_path(ds, model)
            if not path.is_file():
                missing.append(f"{ds}/{model}")
                continue
            try:
                m = read_record(path)
                float(m["fid"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable metrics (%s); reported as not run", path, e)
                missing.append(f"{ds}/{model}")
                continue
            found[(ds, model)] = m
    if missing:
        log.warning(
            "no metrics for %d of %d runs (reported as 'not run'): %s",
            len(missing),
            len(cfg.datasets) * len(cfg.models),
            ", ".join(missing),
        )
    return found, missing


def read_sweeps(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """(dataset, model) -> ddim_sweep.json of every run that has one with rows."""
    out = {}
    for ds in cfg.datasets:
        for model in cfg.models:
            p = cfg.sweep_path(ds, model)
            if not p.is_file():
                continue
            try:
                doc = json.loads(p.read_text())
                doc["points"] = [(float(r["steps"]), float(r["fid"])) for r in doc["rows"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable DDIM sweep (%s); skipped", p, e)
                continue
            out[(ds, model)] = doc
    return out


def scaling_path(cfg: Config) -> Path:
    return cfg.results_dir(*SCALING_BENCHMARK.split("/"))


def read_scaling(cfg: Config) -> Any:
    """The scaling benchmark's JSON document, or None when absent or unreadable."""
    src = scaling_path(cfg)
    if not src.is_file():
        return None
    try:
        return json.loads(src.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s)", src, e)
        return None


def scaling_series(doc: Any, y_key: str) -> dict[str, list[tuple[float, float]]]:
    """variant (or mixer) -> [(pixels, y)] of the scaling benchmark's points; failed points (no value)
    are skipped."""
    series: dict[str, list[tuple[float, float]]] = {}
    points = doc.get("points") if isinstance(doc, dict) else None
    for r in points if isinstance(points, list) else []:
        x, y = _num(r.get(SCALING_X)), _num(r.get(y_key))
        if x is None or y is None:
            continue
        name = str(r.get("variant") or r.get("mixer") or "benchmark")
        series.setdefault(name, []).append((x, y))
    return series


def _num(x: Any) -> float | None:
    import math

    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def real_files(cfg: Config, ds: str) -> list[Path]:
    """The prepared training images (the data stage's manifest)."""
    prepared = cfg.prepared_dir(ds)
    try:
        return split_files(prepared, "train")
    except (UserError, OSError, KeyError, csv.Error) as e:
        log.warning("%s: no readable prepared data (%s); the sample figure shows no real images", prepared, e)
        return []


def sample_files(cfg: Config, ds: str, model: str, n: int) -> list[Path]:
    """The first `n` generated images of a run."""
    folder = cfg.samples_dir(ds, model)
    return sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []


def read_gray(path: Path) -> np.ndarray | None:
    """An image as uint8 grayscale, or None (logged) when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except OSError as e:
        log.warning("%s: unreadable image (%s); left blank in the figure", path, e)
        return None


def read_eval_history(cfg: Config, ds: str, model: str) -> list[dict[str, float]]:
    """The rows of a run's `eval_history.csv` (FID/KID during training), [] when absent or unreadable."""
    path = cfg.train_dir(ds, model) / EVAL_HISTORY
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as fh:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        for r in rows:
            r["step"] = int(r["step"])
        return sorted(rows, key=lambda r: r["step"])
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
        log.warning("%s: unreadable eval history (%s); skipped", path, e)
        return []


def eval_histories(cfg: Config) -> dict[tuple[str, str], list[dict[str, float]]]:
    """(dataset, model) -> eval_history rows of every configured run that has them."""
    out = {}
    for ds in cfg.datasets:
        for model in cfg.models:
            if rows := read_eval_history(cfg, ds, model):
                out[(ds, model)] = rows
    return out


def eval_grid(cfg: Config, ds: str, model: str, step: int, n: int) -> np.ndarray | None:
    """The first `n` samples of the evaluation at `step` (the train folder's `eval/` grid), or None."""
    from vmddpm.io import read_png_grid

    path = cfg.train_dir(ds, model) / EVAL_GRIDS / f"step_{step:08d}.png"
    if not path.is_file():
        return None
    try:
        return read_png_grid(path, cfg.data.image_size, n)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable eval grid (%s); left blank", path, e)
        return None


def mlflow_fid_history(cfg: Config) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(dataset, model) -> [(training step, fid)] from every evaluate run of this scale in the MLflow
    store (a store holds every scale's runs: a demo run must not land on the showcase's curve)."""
    if not cfg.tracking.enabled:
        return {}
    try:
        from vmddpm.tracking import resolve_uri

        uri = resolve_uri(cfg)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
            return {}  # never create a store just to read it
        from vmddpm.tracking import client as tracking_client

        client = tracking_client(cfg)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return {}
        out: dict[tuple[str, str], dict[int, float]] = {}
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.stage = 'evaluate' and tags.scale = '{cfg.scale}'",
            max_results=5000,
        )
        for run in runs:  # newest first: the newest value of a step wins
            key = (run.data.tags.get("dataset"), run.data.tags.get("model"))
            if None in key or run.info.status != "FINISHED":
                continue
            for m in client.get_metric_history(run.info.run_id, "fid"):
                out.setdefault(key, {}).setdefault(int(m.step), float(m.value))
        return {k: sorted(v.items()) for k, v in out.items()}
    except Exception as e:  # a broken or foreign store must not break the report
        log.warning("FID-vs-step history from MLflow unavailable (%s)", e)
        return {}
