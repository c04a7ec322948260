"""The file contracts between stages, each written once: what one stage writes and the next one reads.

Torch-free and pydantic-free on purpose: the Snakemake rules, the CLI and the report import it.

- **prepared dataset** (prepare -> train, sample, evaluate, sweep, report, reader study):
  `data/prepared/<dataset>/manifest.csv` with `MANIFEST_COLUMNS`, one row per PNG slice; `split` is one of
  `SPLITS`, drawn over subjects.
- **train folder** (train -> sample, sweep, report): `LAST` (full state, resumable), `FINAL` (the weights
  the sample stage reads), `HISTORY` (`HISTORY_FIELDS`, GANs `GAN_HISTORY_FIELDS`), with
  `train.eval_every` also `EVAL_HISTORY` (`EVAL_HISTORY_FIELDS`) and `EVAL_GRIDS/step_*.png` (report).
  Beside it, not a stage output (neither Snakemake nor DVC deletes it before or after a job),
  `CHECKPOINTS/<run key>/`: the last `train.keep_checkpoints` step checkpoints of each set of training
  knobs, what a rerun resumes.
- **samples** (sample -> evaluate, report, reader study): `<samples>/000000.png ...`, image i drawn from
  `image_seed(sample.seed, i)`; beside the folder `samples_meta_path()` (`SAMPLES_META_FIELDS`, with the
  sha256 of the `FINAL` they came from) and `samples_grid_path()`.
- **metrics.json** + **protocol.json** (evaluate -> report): the numbers (`METRICS_FIELDS`, numbers only,
  what DVC and pandas read) and how they were made (`PROTOCOL_FIELDS`); `read_record()` joins them.
- **ddim_sweep.json** (sweep -> report): `SWEEP_FIELDS`, one row `{steps, fid, n_fake}` per step count.
- **comparable to the paper**: `comparable(scale, extractor)` decides it where a number is made,
  `is_comparable(record)` re-checks it where a number is read; `label()` is what a table or figure says.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmddpm.errors import UserError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("chestxray", "brats2018", "acdc")
SCALES: tuple[str, ...] = ("demo", "paper", "showcase")
"""The `scales:` overlays params.yaml may hold (`scale:` picks one): demo (the whole DAG on CPU in minutes),
paper (the paper's setting, GPU), showcase (two models on one dataset, trained until they visibly learn
on a laptop-class CPU)."""
FAMILIES: tuple[str, ...] = ("vmunet", "unet_attn", "dit", "gan")
DEFAULT_PARAMS = "params.yaml"

# ------------------------------------------------------------------------------ comparable to the paper
DEMO_LABEL = "demo — not comparable to the paper"
"""The label every number, table and figure made at demo scale or with the random extractor carries."""


def comparable(scale: str | None, extractor: str | None) -> bool:
    """A number may stand beside the paper's only at paper scale with the real Inception weights."""
    return scale == "paper" and extractor == "inception"


def is_comparable(record: Mapping[str, Any]) -> bool:
    """The rule applied to a written record (metrics.json, a table row): its own flag and the rule agree."""
    return bool(record.get("comparable_to_paper")) and comparable(
        record.get("scale"), record.get("extractor")
    )


def label(is_comparable_: bool) -> str:
    """ "" for a comparable number, else `DEMO_LABEL`."""
    return "" if is_comparable_ else DEMO_LABEL


# ---------------------------------------------------------------------------------- prepared dataset
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "subject", "split", "source", "slice")
SPLITS = ("train", "val", "test")


def _prepare_hint(prepared_dir: Path) -> str:
    return f"run `vmddpm prepare --dataset {Path(prepared_dir).name}`"


def read_manifest(prepared_dir: str | Path) -> list[dict[str, str]]:
    """Rows of `manifest.csv` (file, subject, split, source, slice) of a prepared dataset."""
    prepared_dir = Path(prepared_dir)
    manifest = prepared_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(
            f"{prepared_dir}: no prepared dataset (manifest.csv missing); {_prepare_hint(prepared_dir)}"
        )
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise UserError(
                f"{manifest}: columns {reader.fieldnames} are not {list(MANIFEST_COLUMNS)}; "
                f"{_prepare_hint(prepared_dir)} again"
            )
        return list(reader)


def split_files(prepared_dir: str | Path, split: str) -> list[Path]:
    """Absolute paths of the slices of one split, in manifest order."""
    prepared_dir = Path(prepared_dir)
    return [prepared_dir / r["file"] for r in read_manifest(prepared_dir) if r["split"] == split]


# ------------------------------------------------------------------------------------- train folder
LAST = "last.pt"
FINAL = "model.pt"
HISTORY = "history.csv"
HISTORY_FIELDS = ("step", "loss", "lr", "images_per_s")
EVAL_HISTORY = "eval_history.csv"
EVAL_HISTORY_FIELDS = ("step", "fid", "kid_mean", "kid_std", "n_images", "sampler_steps", "grid_images")
"""Diffusion train folders with `train.eval_every` > 0: one row per evaluation during training (at step 0,
every `eval_every` steps and at the end): FID/KID of `train.eval_images` fixed-seed EMA samples (DDIM,
`train.eval_steps`) against the evaluate stage's reference set and extractor (`vmddpm.evalkit`). Rewritten
with `history.csv` at every checkpoint, so it always matches the newest checkpoint."""
EVAL_GRIDS = "eval"
"""`eval/step_XXXXXXXX.png` in the train folder: the first `grid_images` samples of each evaluation as one
grid (`vmddpm.io.write_png_grid`; `read_png_grid` splits it back)."""
GAN_HISTORY_FIELDS = ("step", "loss", "loss_g", "loss_d", "lr", "images_per_s")
CHECKPOINTS = "checkpoints"
"""Beside the train folder: `checkpoints/<run key>/step_XXXXXXXX.pt` + `knobs.json` (vmddpm.trainkit)."""
TRAIN_RUN = "mlflow_run.json"
"""`{"run_id", "model_id"}` of the MLflow run that trained the folder (absent when tracking is off): the
sample, sweep and evaluate runs of that model become its children."""


# ------------------------------------------------------------------------------------------ samples
SEED_STRIDE = 1_000_003
SAMPLES_META_FIELDS = (
    "dataset",
    "model",
    "family",
    "sampler",
    "steps",
    "eta",
    "use_ema",
    "seed",
    "seed_rule",
    "checkpoint_step",
    "model_sha256",
    "image_size",
)


def image_seed(base: int, i: int) -> int:
    """Seed of image i for `sample.seed` = base (distinct bases never share an image seed below 1e6)."""
    return base * SEED_STRIDE + i


def samples_meta_path(samples_dir: str | Path) -> Path:
    """`<samples>_meta.json` beside the samples folder: how its images were drawn."""
    samples_dir = Path(samples_dir)
    return samples_dir.parent / f"{samples_dir.name}_meta.json"


def samples_grid_path(samples_dir: str | Path) -> Path:
    samples_dir = Path(samples_dir)
    return samples_dir.parent / f"{samples_dir.name}_grid.png"


def read_samples_meta(samples_dir: str | Path) -> dict[str, Any] | None:
    """The samples meta of a folder, or None when absent or unreadable (a warning says which)."""
    path = samples_meta_path(samples_dir)
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        log.warning("%s: unreadable (%s)", path, e)
        return None


# ------------------------------------------------------------------------ metrics.json + protocol.json
METRICS_FILE = "metrics.json"
PROTOCOL_FILE = "protocol.json"
METRICS_FIELDS = (
    "fid",
    "kid_mean",
    "kid_std",
    "fid_clean",
    "fid_real_floor",
    "n_real",
    "n_fake",
    "memorised_share",
    "memorised_count",
    "nn_distance_min",
    "nn_distance_median",
)
"""metrics.json: numbers only, what was measured (`fid_clean` only when `eval.clean_fid` computed it)."""
PROTOCOL_FIELDS = (
    "dataset",
    "model",
    "extractor",
    "weights_sha256",
    "resize",
    "sampler",
    "steps",
    "seed",
    "scale",
    "comparable_to_paper",
    "label",
    "clean_fid",
    "memorisation_threshold",
)
"""protocol.json beside it: how the numbers were made (strings, flags, settings, relative paths); every
evaluation carries at least these."""


def protocol_path(metrics_path: str | Path) -> Path:
    """The protocol file that goes with a metrics file: `protocol.json` beside `metrics.json`, else
    `<name>.protocol.json`."""
    metrics_path = Path(metrics_path)
    if metrics_path.name == METRICS_FILE:
        return metrics_path.with_name(PROTOCOL_FILE)
    return metrics_path.with_name(metrics_path.stem + ".protocol.json")


def split_record(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An evaluation record -> (metrics: its finite numbers of `METRICS_FIELDS`, protocol: the rest)."""
    metrics = {
        k: record[k]
        for k in METRICS_FIELDS
        if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
    }
    protocol = {k: v for k, v in record.items() if k not in metrics}
    return metrics, protocol


def read_record(metrics_path: str | Path) -> dict[str, Any]:
    """metrics.json merged with its protocol.json (absent protocol: the metrics file alone, as written
    before the split). Raises OSError / ValueError on unreadable files."""
    metrics_path = Path(metrics_path)
    record = dict(json.loads(metrics_path.read_text()))
    proto = protocol_path(metrics_path)
    if proto.is_file():
        record = {**json.loads(proto.read_text()), **record}
    return record


# ----------------------------------------------------------------------------------- ddim_sweep.json
SWEEP_FILE = "ddim_sweep.json"
SWEEP_DIR = "ddim_sweep"
SWEEP_FIELDS = ("dataset", "model", "sampler", "eta", "extractor", "scale", "label", "applicable", "rows")

# -------------------------------------------------------------------------------- scaling benchmark
SCALING_BENCHMARK = "benchmarks/scaling.json"
"""Under `paths.results`: written by benchmarks/bench_scaling.py, read by the report (claim C5):
`{"points": [{"variant" (or "mixer"), "pixels", "step_s_median", "peak_mem_mb", ...} | {..., "error"}]}`."""
SCALING_X = "pixels"
SCALING_TIME = "step_s_median"
SCALING_MEMORY = "peak_mem_mb"
