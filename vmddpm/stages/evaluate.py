"""`vmddpm evaluate`: FID/KID with a recorded protocol, a clean-fid cross-check, the real-vs-real floor and
a memorisation check of one model's samples: the numbers in `metrics.json`, how they were made in
`protocol.json` beside it (fields, and the split: `vmddpm.contracts`).

The maths is `vmddpm.metrics`; the extractor, the reference set and its cached features are
`vmddpm.evalkit` (shared with the sweep stage). How the samples were drawn comes from the sample stage's
`<samples>_meta.json` when present. One MLflow run per invocation, metrics at the checkpoint's training
step, so evaluations of runs trained for different lengths make an FID-against-step curve in the report.

Nothing stale: metrics.json records the sha256 of the `model.pt` the samples came from
(`model_sha256`), and samples drawn from weights that are no longer the model's (it was retrained) are
refused with one line saying to sample again. One process per output (`.metrics.json.lock`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from vmddpm import io as vio
from vmddpm.config import Config, flatten
from vmddpm.contracts import (
    FINAL,
    comparable,
    label,
    protocol_path,
    read_samples_meta,
    samples_meta_path,
    split_record,
)
from vmddpm.errors import UserError
from vmddpm.evalkit import (
    PROTOCOL_VERSION,
    check_kid_size,
    load_extractor,
    reference_features,
    reference_set,
    reference_tag,
)
from vmddpm.metrics.extractor import FEATURE_LAYER, RESIZE_CLEAN, Extractor, resize_protocol
from vmddpm.metrics.features import extract_clean_features, extract_features
from vmddpm.metrics.fid import frechet_distance, kernel_distance
from vmddpm.metrics.images import ImageSet, list_images, load_folder
from vmddpm.metrics.memorisation import memorisation

log = logging.getLogger(__name__)


def _sampler_fields(cfg: Config, model: str, samples: Path) -> dict[str, Any]:
    """How the samples were drawn: the sample stage's `<samples>_meta.json` when present (it records
    what was actually run, including the checkpoint step), else what the config says."""
    meta = read_samples_meta(samples)
    if meta is not None:
        return {
            "sampler": meta.get("sampler"),
            "steps": meta.get("steps"),
            "seed": meta.get("seed"),
            "eta": meta.get("eta"),
            "checkpoint_step": meta.get("checkpoint_step"),
            "model_sha256": meta.get("model_sha256"),
            "samples_meta": _rel(cfg, samples_meta_path(samples)),
        }
    if cfg.preset(model).family == "gan":
        return {"sampler": "gan", "steps": None, "seed": cfg.sample.seed, "checkpoint_step": None}
    return {
        "sampler": cfg.sample.sampler,
        "steps": cfg.sample.steps,
        "seed": cfg.sample.seed,
        "eta": cfg.sample.eta if cfg.sample.sampler == "ddim" else None,
        "checkpoint_step": None,
    }


def compute_metrics(
    cfg: Config,
    real: ImageSet,
    fake: ImageSet,
    train: ImageSet | None,
    ex: Extractor,
    cache_tag: str,
) -> dict[str, Any]:
    """Every number of metrics.json for one generated set against one reference set."""
    check_kid_size(cfg, (real, fake))
    if real.pixels.shape[1:] != fake.pixels.shape[1:]:
        raise UserError(
            f"{fake.folder}: images are {fake.pixels.shape[2]}x{fake.pixels.shape[1]} but the reference "
            f"{real.folder} has {real.pixels.shape[2]}x{real.pixels.shape[1]}; sample at data.image_size"
        )
    ref = reference_features(cfg, real, ex, cache_tag)
    feats = extract_features(fake.pixels, ex, cfg.eval.batch_size, desc="generated features")
    kid_mean, kid_std = kernel_distance(
        ref["feats"], feats, cfg.eval.kid_subset_size, cfg.eval.kid_subsets, cfg.seed
    )
    fid_clean = None
    if cfg.eval.clean_fid:
        fid_clean = frechet_distance(
            ref["feats_clean"], extract_clean_features(fake.files, ex, cfg.eval.batch_size)
        )
    same_protocol = comparable(cfg.scale, ex.kind)
    out: dict[str, Any] = {
        "fid": frechet_distance(ref["feats"], feats),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "fid_clean": fid_clean,
        "clean_fid": cfg.eval.clean_fid,
        "fid_real_floor": ref["floor"],
        "n_real": len(real),
        "n_fake": len(fake),
        "extractor": ex.kind,
        "weights_sha256": ex.weights_sha256,
        "feature_layer": f"pool3 {FEATURE_LAYER}-d",
        "resize": resize_protocol(ex),
        "resize_clean": RESIZE_CLEAN if cfg.eval.clean_fid else None,
        "image_size": int(fake.pixels.shape[1]),
        "kid_subset_size": cfg.eval.kid_subset_size,
        "kid_subsets": cfg.eval.kid_subsets,
        "scale": cfg.scale,
        "comparable_to_paper": same_protocol,
        "label": label(same_protocol),
        "reference_key": ref["key"],
        "protocol_version": PROTOCOL_VERSION,
        "versions": _versions(),
    }
    if train is not None:
        out.update(
            memorisation(
                fake.pixels, train.pixels, cfg.eval.memorisation_threshold, cfg.data.hflip, ex.device
            )
        )
        if out["memorised_count"]:
            log.warning(
                "%s: %d of %d generated images are within %.3g of a training image (possible memorisation)",
                fake.folder,
                out["memorised_count"],
                len(fake),
                cfg.eval.memorisation_threshold,
            )
    return out


def _versions() -> dict[str, str]:
    import cleanfid
    import torch_fidelity

    return {
        "torch": torch.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "clean_fid": getattr(cleanfid, "__version__", "unknown"),
    }


def evaluate(
    cfg: Config,
    dataset: str,
    model: str,
    samples: Path | None = None,
    out: Path | None = None,
) -> Path:
    """`vmddpm evaluate`: metrics.json for `model`'s samples on `dataset` (and an MLflow run)."""
    cfg.dataset(dataset)
    cfg.preset(model)
    samples = Path(samples) if samples is not None else cfg.samples_dir(dataset, model)
    out = Path(out) if out is not None else cfg.metrics_path(dataset, model)
    with vio.output_lock(out, "evaluate"):
        vio.ensure_writable(out.parent)
        return _evaluate(cfg, dataset, model, samples, out)


def check_samples_fresh(cfg: Config, dataset: str, model: str, samples: Path) -> None:
    """Samples whose meta names another `model.pt` than the current one of the model that drew them
    (the meta's dataset and model; the command's when it names none) are stale."""
    meta = read_samples_meta(samples)
    if not meta or not meta.get("model_sha256"):
        return
    dataset, model = str(meta.get("dataset") or dataset), str(meta.get("model") or model)
    final = cfg.train_dir(dataset, model) / FINAL
    if not final.is_file():
        return
    now = vio.sha256_file(final)
    if meta["model_sha256"] != now:
        raise UserError(
            f"{samples}: drawn from model.pt sha256 {meta['model_sha256'][:12]}, but {final} is now "
            f"{now[:12]} (retrained); draw them again with `vmddpm sample --dataset {dataset} --model "
            f"{model}`, then evaluate"
        )


def _evaluate(cfg: Config, dataset: str, model: str, samples: Path, out: Path) -> Path:
    list_images(samples)  # a bad samples folder fails fast, before the reference set is read
    check_samples_fresh(cfg, dataset, model, samples)
    real, train = reference_set(cfg, dataset)
    n_fake = cfg.eval.n_fake or len(real)
    fake = load_folder(samples, "generated", limit=n_fake)
    ex = load_extractor(cfg)
    metrics = {
        "dataset": dataset,
        "model": model,
        **_sampler_fields(cfg, model, samples),
        "reference_split": cfg.eval.reference_split,
        "samples_dir": _rel(cfg, samples),
        **compute_metrics(cfg, real, fake, train, ex, cache_tag=reference_tag(cfg, dataset)),
    }
    numbers, protocol = split_record(metrics)
    vio.write_json(protocol_path(out), protocol)
    vio.write_json(out, numbers)
    log.info(
        "%s/%s: FID %.4g (clean-fid %s, real floor %s), KID %.4g ± %.2g, memorised %.1f%% -> %s",
        dataset,
        model,
        metrics["fid"],
        _fmt(metrics["fid_clean"]),
        _fmt(metrics["fid_real_floor"]),
        metrics["kid_mean"],
        metrics["kid_std"],
        100 * metrics.get("memorised_share", 0.0),
        out,
    )
    _track(cfg, dataset, model, metrics, out)
    return out


def _rel(cfg: Config, path: Path) -> str:
    """A path as recorded in protocol.json: relative to the project (the folder of params.yaml)."""
    return os.path.relpath(Path(path).resolve(), cfg.root)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _track(cfg: Config, dataset: str, model: str, metrics: dict[str, Any], out: Path) -> None:
    """One MLflow run per evaluate invocation (vmddpm.tracking owns the store, tags and retries), a child
    of the train run whose model made the samples. Its params are every knob the FID depends on (the
    train, sample and evaluate knobs of this dataset and model, and for a vmunet preset its resolved
    `model.*`: `params.model.sr`, ...), so the runs table filters and compares FIDs by them.

    Metrics are logged at step = the checkpoint's training step (else train.steps) so that evaluations
    of runs trained for different lengths
    (e.g. `dvc exp run -S train.steps=...`) make an FID-against-training-step curve in the report.
    """
    from vmddpm.pipeline import stage_params
    from vmddpm.tracking import start_run, train_run_id

    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }
    protocol = {
        k: str(metrics[k])
        for k in ("extractor", "weights_sha256", "resize", "sampler", "steps", "seed", "reference_split")
        if k in metrics
    }
    preset = cfg.preset(model)
    knobs: dict[str, Any] = {"dataset": dataset, "model": model, "family": preset.family}
    for stage in ("train", "sample", "evaluate"):
        knobs.update(flatten(stage_params(cfg, stage, dataset, model)))
    if preset.family == "vmunet":  # the preset's own network: `model.sr` is `none` for vmddpm_csm
        knobs.update(flatten({"model": dataclasses.asdict(cfg.model_config(model))}))
    parent = train_run_id(cfg, dataset, model)
    tags = {"label": metrics["label"] or "paper-protocol"}
    with start_run(
        cfg, "evaluate", dataset=dataset, model=model, tags=tags, parent=parent, output=out
    ) as run:
        run.log_params(knobs)
        run.log_params({f"eval_protocol.{k}": v for k, v in protocol.items()})
        step = metrics.get("checkpoint_step")
        run.log_metrics(numeric, step=step if isinstance(step, int) else cfg.train.steps)
        run.log_artifact(out)
        run.log_artifact(protocol_path(out))
