"""The `report` stage: paper-vs-ours tables and figures from every `metrics.json` of the matrix.

Why it is built this way:

* It reads only files (metrics.json, `<samples>_meta.json`, ddim_sweep.json, the scaling benchmark,
  the MLflow store for FID-against-training-step) and never recomputes a number, so it runs in
  seconds and can be rerun after any subset of evaluations.
* A missing evaluation is a row that says "not run" (and a log warning naming it), never a crash:
  the report of a half-finished matrix is still useful.
* Demo-scale or random-extractor numbers are labelled "demo — not comparable to the paper" in every
  table row, table header and figure title, and never enter the comparison with the paper
  (`fid_minus_paper` stays empty, the paper's values are not drawn beside them).
* `results/paper/reference.csv` (the paper's numbers, with source) is read, never written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmddpm import io as vio
from vmddpm.config import DEMO_LABEL, Config
from vmddpm.errors import UserError

log = logging.getLogger(__name__)

NOT_RUN = "not run"
MAIN_COLUMNS = (
    "dataset",
    "model",
    "family",
    "rank",
    "fid",
    "fid_paper",
    "paper_source",
    "fid_minus_paper",
    "kid_mean",
    "kid_std",
    "fid_clean",
    "fid_real_floor",
    "memorised_share",
    "nn_distance_median",
    "n_real",
    "n_fake",
    "extractor",
    "weights_sha256",
    "resize",
    "sampler",
    "steps",
    "seed",
    "scale",
    "comparable_to_paper",
    "label",
)
ABLATION_COLUMNS = (
    "dataset",
    "model",
    "change",
    "fid",
    "fid_minus_vmddpm",
    "kid_mean",
    "fid_real_floor",
    "fid_paper",
    "scale",
    "extractor",
    "label",
)


# ------------------------------------------------------------------------------------------- inputs
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
    """Every metrics.json of the configured datasets x models; the missing ones as 'ds/model'."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    missing: list[str] = []
    for ds in cfg.datasets:
        for model in cfg.models:
            path = cfg.metrics_path(ds, model)
            if not path.is_file():
                missing.append(f"{ds}/{model}")
                continue
            try:
                m = json.loads(path.read_text())
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


def is_comparable(m: dict[str, Any]) -> bool:
    return (
        bool(m.get("comparable_to_paper")) and m.get("scale") == "paper" and m.get("extractor") == "inception"
    )


# ------------------------------------------------------------------------------------------ tables
def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def main_rows(cfg: Config, metrics: dict, reference: dict) -> list[dict[str, Any]]:
    """One row per dataset x model, ranked by FID within each dataset; not-run rows last."""
    rows: list[dict[str, Any]] = []
    for ds in cfg.datasets:
        block = []
        for model in cfg.models:
            ref = reference.get((ds, model), {})
            row: dict[str, Any] = {k: None for k in MAIN_COLUMNS}
            row.update(dataset=ds, model=model, family=cfg.preset(model).family)
            row["fid_paper"] = ref.get("value")
            row["paper_source"] = ref.get("source") if ref.get("value") is not None else None
            m = metrics.get((ds, model))
            if m is None:
                row["label"] = NOT_RUN
            else:
                for k in MAIN_COLUMNS:
                    if k in m and k not in (
                        "dataset",
                        "model",
                        "family",
                        "fid_paper",
                        "paper_source",
                        "label",
                    ):
                        row[k] = m[k]
                comparable = is_comparable(m)
                row["comparable_to_paper"] = comparable
                row["label"] = "" if comparable else DEMO_LABEL
                if comparable and row["fid_paper"] is not None:
                    row["fid_minus_paper"] = float(m["fid"]) - row["fid_paper"]
            block.append(row)
        ranked = sorted((r for r in block if _num(r["fid"]) is not None), key=lambda r: r["fid"])
        for i, r in enumerate(ranked, start=1):
            r["rank"] = i
        rows += ranked + [r for r in block if r["rank"] is None]
    return rows


def _change(cfg: Config, model: str) -> str:
    over = cfg.preset(model).model or {}
    if not over:
        full = cfg.model_config(model)
        return f"full model (sr={full.sr}, mss_levels={full.mss_levels}, mixer={full.mixer})"
    return ", ".join(f"{k}={v}" for k, v in over.items())


def ablation_rows(cfg: Config, metrics: dict, reference: dict) -> list[dict[str, Any]]:
    """The vmunet-family presets of `models:`, each against the full `vmddpm` on every dataset."""
    presets = [m for m in cfg.models if cfg.preset(m).family == "vmunet"]
    rows = []
    for ds in cfg.datasets:
        base = _num((metrics.get((ds, "vmddpm")) or {}).get("fid"))
        for model in presets:
            m = metrics.get((ds, model))
            fid = _num((m or {}).get("fid"))
            rows.append(
                {
                    "dataset": ds,
                    "model": model,
                    "change": _change(cfg, model),
                    "fid": fid,
                    "fid_minus_vmddpm": None if fid is None or base is None else fid - base,
                    "kid_mean": (m or {}).get("kid_mean"),
                    "fid_real_floor": (m or {}).get("fid_real_floor"),
                    "fid_paper": reference.get((ds, model), {}).get("value"),
                    "scale": (m or {}).get("scale"),
                    "extractor": (m or {}).get("extractor"),
                    "label": NOT_RUN if m is None else ("" if is_comparable(m) else DEMO_LABEL),
                }
            )
    return rows


def _cell(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return ""
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def _md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _banner(rows: Sequence[dict[str, Any]]) -> str:
    demo = [r for r in rows if r.get("label") == DEMO_LABEL]
    if not demo:
        return ""
    why = sorted({f"scale={r.get('scale')}, extractor={r.get('extractor')}" for r in demo})
    return (
        f"> **{DEMO_LABEL.upper()}**: {len(demo)} of these rows were computed at {'; '.join(why)}. "
        "They check that the pipeline runs end to end; they say nothing about the paper's claims. "
        "The paper's numbers are shown for reference only and no difference to them is computed.\n\n"
    )


def _protocol(r: dict[str, Any]) -> str:
    if r.get("extractor") is None:
        return ""
    sha = str(r.get("weights_sha256") or "")[:8]
    steps = f" {r['steps']} steps" if r.get("steps") not in (None, "") else ""
    return f"{r['extractor']} ({sha}), {r.get('sampler')}{steps}, seed {r.get('seed')}, {r.get('scale')}"


def main_markdown(rows: Sequence[dict[str, Any]], claims: dict[str, Any]) -> str:
    out = ["# VM-DDPM reproduction: main results (FID, lower is better)\n\n"]
    out.append(_banner(rows))
    out.append(
        "Ours: FID of `n_fake` generated images against the `n_real` reference images (torch-fidelity "
        "Inception-v3 pool features); clean-fid = the same with clean-fid's resize; floor = FID between "
        "two halves of the real set (what real data scores at this N); memorised = share of generated "
        "images within the memorisation threshold of a training image. Paper: arXiv:2405.05667; "
        "empty = not stated in the material we have.\n"
    )
    header = [
        "rank", "model", "FID (ours)", "FID (paper)", "ours − paper", "KID", "clean-fid FID",
        "real floor", "memorised", "n real / fake", "protocol", "label",
    ]  # fmt: skip
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        out.append(f"\n## {ds}\n")
        body = []
        for r in (r for r in rows if r["dataset"] == ds):
            kid = (
                "" if r.get("kid_mean") is None else f"{_cell(r['kid_mean'])} ± {_cell(r.get('kid_std'), 2)}"
            )
            n = "" if r.get("n_real") is None else f"{r['n_real']} / {r['n_fake']}"
            mem = "" if r.get("memorised_share") is None else f"{100 * r['memorised_share']:.1f}%"
            body.append(
                [
                    _cell(r["rank"]),
                    r["model"],
                    _cell(r["fid"]),
                    _cell(r["fid_paper"]),
                    _cell(r["fid_minus_paper"]),
                    kid,
                    _cell(r["fid_clean"]),
                    _cell(r["fid_real_floor"]),
                    mem,
                    n,
                    _protocol(r),
                    r["label"] or "paper protocol",
                ]
            )
        out.append(_md_table(header, body) + "\n")
    out.append("\n## Claims (PAPER.md)\n")
    for c in claims.values():
        out.append(f"- **{c['id']}** {c['claim']}: {c['verdict']}\n")
    return "".join(out)


def ablation_markdown(cfg: Config, rows: Sequence[dict[str, Any]]) -> str:
    out = ["# VM-DDPM ablations (FID, lower is better; Δ = preset − full vmddpm)\n\n", _banner(rows)]
    header = ["model", "change"] + [f"{ds} FID (Δ)" for ds in cfg.datasets] + ["label"]
    body = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["dataset"]: r for r in rows if r["model"] == model}
        cells = []
        for ds in cfg.datasets:
            r = mine.get(ds, {})
            if r.get("fid") is None:
                cells.append(NOT_RUN)
            elif r.get("fid_minus_vmddpm") is None or model == "vmddpm":
                cells.append(_cell(r["fid"]))
            else:
                cells.append(f"{_cell(r['fid'])} ({r['fid_minus_vmddpm']:+.3g})")
        labels = sorted({r["label"] for r in mine.values() if r["label"]})
        body.append(
            [model, next(iter(mine.values()))["change"], *cells, "; ".join(labels) or "paper protocol"]
        )
    out.append(_md_table(header, body) + "\n")
    return "".join(out)


# ------------------------------------------------------------------------------------------ claims
def claims(cfg: Config, metrics: dict, reference: dict) -> dict[str, Any]:
    """What the tables say about C1-C3, always qualified by whether the numbers are comparable."""

    def fid(ds: str, model: str) -> float | None:
        return _num((metrics.get((ds, model)) or {}).get("fid"))

    def tag(ds: str) -> str:
        demo = any(not is_comparable(m) for (d, _), m in metrics.items() if d == ds)
        return f" ({DEMO_LABEL})" if demo else ""

    c1 = []
    for ds in cfg.datasets:
        m, p = metrics.get((ds, "vmddpm")), reference.get((ds, "vmddpm"), {}).get("value")
        if m is not None and is_comparable(m) and p is not None:
            c1.append(f"{ds} {m['fid']:.4g} vs paper {p:.4g}")
    baselines = [m for m in cfg.models if cfg.preset(m).family != "vmunet"]
    c2, c3 = [], []
    for ds in cfg.datasets:
        ours = fid(ds, "vmddpm")
        others = {b: fid(ds, b) for b in baselines if fid(ds, b) is not None}
        if ours is not None and others:
            beaten = sum(ours < v for v in others.values())
            c2.append(f"{ds}: beats {beaten}/{len(others)}{tag(ds)}")
        csm = fid(ds, "vmddpm_csm")
        if ours is not None and csm is not None:
            c3.append(f"{ds}: {'yes' if ours < csm else 'no'} ({ours:.4g} vs {csm:.4g}){tag(ds)}")
    return {
        "C1": {
            "id": "C1",
            "claim": "VM-DDPM FID 11.783 / 12.513 / 34.525",
            "verdict": (
                "; ".join(c1) if c1 else "no comparable run yet (needs scale=paper and the real Inception)"
            ),
        },
        "C2": {
            "id": "C2",
            "claim": "VM-DDPM beats the baselines",
            "verdict": "; ".join(c2) if c2 else "not run",
        },
        "C3": {
            "id": "C3",
            "claim": "Sequence Regeneration beats the plain CSM",
            "verdict": "; ".join(c3) if c3 else "not run",
        },
    }


def summary(
    cfg: Config, rows: Sequence[dict[str, Any]], missing: list[str], cl: dict[str, Any]
) -> dict[str, Any]:
    """Machine-readable (DVC metrics): nested dataset -> model -> numbers; missing runs listed."""
    per: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["fid"] is None:
            continue
        per.setdefault(r["dataset"], {})[r["model"]] = {
            k: r[k]
            for k in ("fid", "kid_mean", "kid_std", "fid_clean", "fid_real_floor", "memorised_share", "rank")
            if _num(r.get(k)) is not None
        }
    done = [r for r in rows if r["fid"] is not None]
    comparable = bool(done) and all(r["comparable_to_paper"] for r in done)
    return {
        "scale": cfg.scale,
        "comparable_to_paper": comparable,
        "label": "" if comparable else DEMO_LABEL,
        "n_runs": len(done),
        "not_run": missing,
        "fid": per,
        "claims": {k: v["verdict"] for k, v in cl.items()},
    }


# ----------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with vio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _note(ax: Any, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes, color="0.3"
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _title(fig: Any, title: str, demo: bool) -> None:
    fig.suptitle(title + (f"\n{DEMO_LABEL.upper()}" if demo else ""), color="darkred" if demo else "black")


def _read_gray(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except OSError as e:
        log.warning("%s: unreadable image (%s); left blank in the figure", path, e)
        return None


def _real_files(cfg: Config, ds: str) -> list[Path]:
    """The prepared training images (the data stage's manifest.csv: columns file, split)."""
    prepared = cfg.prepared_dir(ds)
    manifest = prepared / "manifest.csv"
    if not manifest.is_file():
        log.warning("%s: no prepared data; the sample figure shows no real images", prepared)
        return []
    try:
        with open(manifest, newline="") as fh:
            return [prepared / r["file"] for r in csv.DictReader(fh) if r.get("split") == "train"]
    except (OSError, KeyError, csv.Error) as e:
        log.warning("%s: unreadable (%s); the sample figure shows no real images", manifest, e)
        return []


def sample_figure(cfg: Config, ds: str, metrics: dict, path: Path, per_row: int) -> Path:
    """Real training images (top row) above each model's first generated images, FID in the label."""
    plt = _plt()
    rows: list[tuple[str, list[Path]]] = [("real (train)", _real_files(cfg, ds)[:per_row])]
    for model in cfg.models:
        folder = cfg.samples_dir(ds, model)
        files = sorted(folder.glob("*.png"))[:per_row] if folder.is_dir() else []
        m = metrics.get((ds, model))
        label = model + (f"\nFID {m['fid']:.3g}" if m else "\nnot run")
        rows.append((label, files))
    fig, axes = plt.subplots(
        len(rows),
        per_row,
        figsize=(per_row * 0.9 + 1.4, len(rows) * 0.95 + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for i, (label, files) in enumerate(rows):
        for j in range(per_row):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            img = _read_gray(files[j]) if j < len(files) else None
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            elif j == 0:
                ax.text(0.0, 0.5, "no images", fontsize=7, color="0.4", transform=ax.transAxes)
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    demo = any(not is_comparable(m) for (d, _), m in metrics.items() if d == ds)
    _title(fig, f"{ds}: real images (top) and samples of each model", demo)
    return _save(fig, path)


def _mlflow_fid_history(cfg: Config) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(dataset, model) -> [(training step, fid)] from every evaluate run in the MLflow store."""
    if not cfg.tracking.enabled:
        return {}
    try:
        from vmddpm.tracking import resolve_uri

        uri = resolve_uri(cfg)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
            return {}  # never create a store just to read it
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return {}
        out: dict[tuple[str, str], dict[int, float]] = {}
        runs = client.search_runs(
            [exp.experiment_id], filter_string="tags.stage = 'evaluate'", max_results=5000
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


def _lines_figure(
    cfg: Config,
    data: dict[tuple[str, str], list[tuple[float, float]]],
    path: Path,
    title: str,
    xlabel: str,
    empty_note: str,
    demo: bool,
    logx: bool = False,
) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(
        1,
        len(cfg.datasets),
        figsize=(4.2 * len(cfg.datasets) + 1.8, 3.8),
        squeeze=False,
        layout="constrained",
    )
    colors = _colors(cfg)
    handles: dict[str, Any] = {}
    for ax, ds in zip(axes[0], cfg.datasets, strict=True):
        series = {m: pts for (d, m), pts in data.items() if d == ds and pts}
        ax.set_title(ds)
        if not series:
            _note(ax, empty_note)
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
    _title(fig, title, demo)
    return _save(fig, path)


def _colors(cfg: Config) -> dict[str, Any]:
    """One fixed colour per model across every figure (by position in `models:`: tab10, then tab20b)."""
    plt = _plt()
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    return {m: palette[i % len(palette)] for i, m in enumerate(cfg.models)}


def step_figure(cfg: Config, metrics: dict, path: Path) -> Path:
    data: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (ds, model), pts in _mlflow_fid_history(cfg).items():
        if ds in cfg.datasets and model in cfg.models:
            data[(ds, model)] = [(float(s), v) for s, v in pts]
    for ds in cfg.datasets:  # runs without tracking: their own metrics.json, at their checkpoint step
        for model in cfg.models:
            m = metrics.get((ds, model))
            if (ds, model) not in data and m and isinstance(m.get("checkpoint_step"), int):
                data[(ds, model)] = [(float(m["checkpoint_step"]), float(m["fid"]))]
    demo = any(not is_comparable(m) for m in metrics.values())
    return _lines_figure(
        cfg,
        data,
        path,
        "FID against training step",
        "training step",
        "no evaluation with a known training step yet:\nevery `vmddpm evaluate` adds a point "
        "(MLflow, step = checkpoint step);\ne.g. `dvc exp run -S scales.demo.train.steps=300`",
        demo,
    )


def ddim_figure(cfg: Config, path: Path) -> Path:
    data: dict[tuple[str, str], list[tuple[float, float]]] = {}
    demo = False
    for ds in cfg.datasets:
        for model in cfg.models:
            p = cfg.run_dir(ds, model) / "ddim_sweep.json"
            if not p.is_file():
                continue
            try:
                doc = json.loads(p.read_text())
                data[(ds, model)] = [(float(r["steps"]), float(r["fid"])) for r in doc["rows"]]
                demo |= bool(doc.get("label"))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable DDIM sweep (%s); skipped", p, e)
    return _lines_figure(
        cfg,
        data,
        path,
        f"FID against DDIM sampling steps (eval.ddim_steps_sweep = {cfg.eval.ddim_steps_sweep})",
        "DDIM steps",
        "no DDIM sweep run:\n`vmddpm evaluate --dataset D --model M --ddim-sweep`",
        demo,
        logx=True,
    )


X_KEYS = ("pixels", "n_pixels", "tokens", "seq_len", "length", "resolution", "image_size", "size")
TIME_KEYS = ("step_s_median", "time_s", "seconds", "ms", "time_ms", "mean_ms", "median_ms", "latency_ms")
MEM_KEYS = ("peak_mem_mb", "mem_mb", "memory_mb")
GROUP_KEYS = ("mixer", "backend", "model", "kind", "name", "method")


def _scaling_series(doc: Any, y_keys: Sequence[str] = TIME_KEYS) -> tuple[str, str, dict[str, list]]:
    """Best-effort reading of the scaling benchmark (benchmarks/bench_scaling.py writes
    {"points": [{"mixer", "pixels", "step_s_median", "peak_mem_mb", ...} | {"mixer", "size", "error"}]}):
    every list of records under any key; records lacking the size or the value (failed points) are
    skipped; grouped by the first group field present."""
    records: list[dict[str, Any]] = []

    def walk(x: Any) -> None:
        if isinstance(x, list) and x and all(isinstance(r, dict) for r in x):
            records.extend(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(doc)
    xk = next((k for k in X_KEYS if any(_num(r.get(k)) is not None for r in records)), None)
    yk = next((k for k in y_keys if any(_num(r.get(k)) is not None for r in records)), None)
    if xk is None or yk is None:
        return "", "", {}
    usable = [r for r in records if _num(r.get(xk)) is not None and _num(r.get(yk)) is not None]
    gk = next((k for k in GROUP_KEYS if all(k in r for r in usable)), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in usable:
        series.setdefault(str(r[gk]) if gk else "benchmark", []).append((float(r[xk]), float(r[yk])))
    return xk, yk, series


def scaling_figure(cfg: Config, path: Path) -> Path:
    """Time (and peak memory, when recorded) per training step against pixels, log-log; each curve's
    legend gives the log-log slope between its two largest sizes (1 = linear, 2 = quadratic)."""
    plt = _plt()
    src = cfg.results_dir("benchmarks", "scaling.json")
    doc: Any = None
    if src.is_file():
        try:
            doc = json.loads(src.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s)", src, e)
    panels = [(_scaling_series(doc, TIME_KEYS), "time"), (_scaling_series(doc, MEM_KEYS), "memory")]
    panels = [(p, what) for p, what in panels if p[2]]
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    if not panels:
        _note(
            axes[0], f"no usable scaling benchmark at\n{src}\n(run benchmarks/bench_scaling.py to write it)"
        )
    for ax, ((xk, yk, series), what) in zip(axes, panels, strict=False):
        for name, pts in sorted(series.items()):
            xs, ys = zip(*sorted(pts), strict=True)
            label = name
            if len(xs) > 1 and xs[-1] > xs[-2] and ys[-1] > 0 and ys[-2] > 0:
                slope = math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])
                label = f"{name}: slope {slope:.2f}"
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xk)
        ax.set_ylabel(yk)
        ax.grid(alpha=0.3, which="both")
        ax.legend(
            fontsize=8, title="log-log slope of the last step\n(1 = linear, 2 = quadratic)", title_fontsize=7
        )
        ax.set_title(what, fontsize=9)
    fig.suptitle("Cost against image size (paper claim C5: linear for the CSM)", fontsize=10)
    return _save(fig, path)


def overview_figure(cfg: Config, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """FID of every model per dataset (bars); the paper's VM-DDPM value as a line only beside
    comparable numbers."""
    plt = _plt()
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
            note = "paper value not drawn:\nthese numbers are not comparable"
            ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", fontsize=7, color="darkred")
    _title(fig, "FID per dataset and model (lower is better)", demo)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- stage
def report(cfg: Config) -> Path:
    """`vmddpm report`: tables (CSV + Markdown), summary.json and figures; returns the tables folder."""
    reference = read_reference(cfg)
    metrics, missing = read_metrics(cfg)
    tables, figures = cfg.results_dir("tables"), cfg.results_dir("figures")
    rows = main_rows(cfg, metrics, reference)
    abl = ablation_rows(cfg, metrics, reference)
    cl = claims(cfg, metrics, reference)
    vio.write_text(tables / "main.csv", to_csv(rows, MAIN_COLUMNS))
    vio.write_text(tables / "main.md", main_markdown(rows, cl))
    vio.write_text(tables / "ablation.csv", to_csv(abl, ABLATION_COLUMNS))
    vio.write_text(tables / "ablation.md", ablation_markdown(cfg, abl))
    vio.write_json(tables / "summary.json", summary(cfg, rows, missing, cl))
    written = [overview_figure(cfg, rows, figures / "fid_overview.png")]
    for ds in cfg.datasets:
        written.append(sample_figure(cfg, ds, metrics, figures / f"samples_{ds}.png", per_row=8))
    written.append(step_figure(cfg, metrics, figures / "fid_vs_train_step.png"))
    written.append(ddim_figure(cfg, figures / "fid_vs_ddim_steps.png"))
    written.append(scaling_figure(cfg, figures / "scaling.png"))
    log.info(
        "report: %d of %d runs evaluated; tables in %s, %d figures in %s",
        len(metrics),
        len(cfg.datasets) * len(cfg.models),
        tables,
        len(written),
        figures,
    )
    return tables
