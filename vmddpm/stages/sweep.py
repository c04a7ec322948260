"""`vmddpm sweep`: FID against the number of DDIM sampling steps (`eval.ddim_steps_sweep`).

For each step count k the stage draws the model's samples with DDIM-k (the sample stage's code,
`vmddpm.generation`, and its seeds) into `runs/<dataset>/<model>/ddim_sweep/steps_<k>/`, takes their
features with the evaluation's extractor and cached reference features (`vmddpm.evalkit`), and writes
`runs/<dataset>/<model>/ddim_sweep.json` (fields: `vmddpm.contracts.SWEEP_FIELDS`) for the report's
FID-against-steps figure. Like the sample folder, each step folder resumes: a rerun draws only missing
images.

A GAN has no sampling steps: its sweep file says so (`applicable: false`, no rows) instead of failing, so
the sweep runs over the whole model matrix in Snakemake and DVC. An empty `eval.ddim_steps_sweep` turns
the sweep off the same way (no sampling at all).

ddim_sweep.json records the sha256 of the `model.pt` its samples came from; step folders drawn from
other weights are drawn again (`vmddpm.generation.plan`). One process per output (`.ddim_sweep.lock`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vmddpm import io as vio
from vmddpm.config import Config
from vmddpm.contracts import comparable, label
from vmddpm.evalkit import check_kid_size, load_extractor, reference_features, reference_set, reference_tag
from vmddpm.generation import draw, plan
from vmddpm.io import ensure_writable, output_lock
from vmddpm.metrics.features import extract_features
from vmddpm.metrics.fid import frechet_distance
from vmddpm.metrics.images import load_folder
from vmddpm.tracking import start_run, train_run_id

log = logging.getLogger(__name__)


def sweep(cfg: Config, dataset: str, model: str) -> Path:
    """Sample and evaluate `model` on `dataset` at each `eval.ddim_steps_sweep` step count; returns the
    path of ddim_sweep.json."""
    cfg.preset(model)
    cfg.dataset(dataset)
    with output_lock(cfg.sweep_dir(dataset, model), "sweep"):
        ensure_writable(cfg.sweep_dir(dataset, model), cfg.sweep_path(dataset, model).parent)
        return _sweep(cfg, dataset, model)


def _sweep(cfg: Config, dataset: str, model: str) -> Path:
    preset = cfg.preset(model)
    path = cfg.sweep_path(dataset, model)
    doc: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "sampler": "ddim",
        "eta": cfg.sample.eta,
        "scale": cfg.scale,
        "steps_sweep": list(cfg.eval.ddim_steps_sweep),
    }
    cfg.sweep_dir(dataset, model).mkdir(parents=True, exist_ok=True)  # a declared output, even when empty
    if preset.family == "gan" or not cfg.eval.ddim_steps_sweep:
        why = (
            f"presets.{model} is a GAN: it has no sampling steps"
            if preset.family == "gan"
            else "eval.ddim_steps_sweep is empty"
        )
        log.info("%s/%s: no DDIM sweep (%s)", dataset, model, why)
        doc.update(extractor=cfg.eval.extractor, label=label(comparable(cfg.scale, cfg.eval.extractor)))
        vio.write_json(path, {**doc, "applicable": False, "reason": why, "rows": []})
        return path

    real, _ = reference_set(cfg, dataset)
    ex = load_extractor(cfg)
    ref = reference_features(cfg, real, ex, reference_tag(cfg, dataset))
    rows = []
    parent = train_run_id(cfg, dataset, model)
    out = cfg.sweep_dir(dataset, model)
    with start_run(cfg, "sweep", dataset=dataset, model=model, parent=parent, output=out) as run:
        run.log_params(cfg.flat())
        for k in cfg.eval.ddim_steps_sweep:
            sub = cfg.with_sample(sampler="ddim", steps=k)
            folder = cfg.sweep_dir(dataset, model) / f"steps_{k}"
            p = plan(sub, dataset, model, folder)
            doc["model_sha256"] = p.gen.model_sha256
            draw(p, sub.sample.seed, sub.sample.batch_size, desc=f"sweep {dataset}/{model} DDIM-{k}")
            fake = load_folder(folder, f"generated (DDIM {k} steps)", limit=cfg.eval.n_fake or len(real))
            check_kid_size(cfg, (fake,))
            feats = extract_features(fake.pixels, ex, cfg.eval.batch_size, desc=f"DDIM {k} features")
            fid = frechet_distance(ref["feats"], feats)
            rows.append({"steps": k, "fid": fid, "n_fake": len(fake)})
            run.log_metrics({"fid": fid, "n_fake": float(len(fake))}, step=k)
            log.info("%s/%s: DDIM-%d FID %.4g (%d images)", dataset, model, k, fid, len(fake))
        doc.update(extractor=ex.kind, label=label(comparable(cfg.scale, ex.kind)))
        vio.write_json(path, {**doc, "applicable": True, "rows": rows})
        run.log_artifact(path)
    return path
