"""`vmddpm reader-study make | score`: a blinded real/synthetic reader study (the paper's radiologist
evaluation, repeatable by any group with its own readers). The parts are `vmddpm.readerstudy`."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from vmddpm import __version__
from vmddpm import io as vio
from vmddpm.config import Config
from vmddpm.contracts import MANIFEST, read_manifest
from vmddpm.errors import UserError
from vmddpm.readerstudy.figure import scores_figure
from vmddpm.readerstudy.format import CHANCE, FORMAT_VERSION, KEY_CSV, READER_DIR, STUDY_JSON, SYNTHETIC
from vmddpm.readerstudy.make import draw, refuse_existing, write_kit
from vmddpm.readerstudy.score import read_answers, read_key, read_study
from vmddpm.readerstudy.stats import agreement_scores, json_safe, reader_scores
from vmddpm.readerstudy.summary import fmt, summary_markdown

log = logging.getLogger(__name__)


def make_study(
    cfg: Config,
    dataset: str,
    model: str,
    n_real: int,
    n_fake: int,
    seed: int | None,
    out: str | Path,
    samples: str | Path | None = None,
) -> Path:
    """Draw `n_real` real test images and `n_fake` generated ones, shuffle them under `seed`, and
    write a blinded study kit to `out` (see `vmddpm.readerstudy`). Returns `out`.

    Real images come from the `test` split of the prepared dataset's manifest (the images no model
    was trained on); generated ones from `samples` (default: the sample stage's folder).
    """
    cfg.dataset(dataset)  # unknown dataset -> one-line error naming params.yaml
    cfg.preset(model)
    seed = cfg.seed if seed is None else int(seed)
    if n_real < 1 or n_fake < 1:
        raise UserError(
            f"--n-real ({n_real}) and --n-fake ({n_fake}) must both be at least 1: sensitivity and "
            "specificity need real and synthetic images"
        )
    out = Path(out)
    refuse_existing(out)

    prepared = cfg.prepared_dir(dataset)
    manifest = prepared / MANIFEST
    test_files = sorted(prepared / r["file"] for r in read_manifest(prepared) if r["split"] == "test")
    if len(test_files) < n_real:
        raise UserError(
            f"{manifest}: the test split has {len(test_files)} images but --n-real is {n_real}; "
            f"ask for fewer, or prepare more subjects (data.{dataset}.max_subjects, data.split.test)"
        )
    samples = Path(samples) if samples is not None else cfg.samples_dir(dataset, model)
    fake_files = sorted(samples.glob("*.png")) if samples.is_dir() else []
    if len(fake_files) < n_fake:
        raise UserError(
            f"{samples}: {len(fake_files)} generated PNGs but --n-fake is {n_fake}; run "
            f"`vmddpm sample --dataset {dataset} --model {model}` (with sample.n_images >= {n_fake})"
        )

    ids, items = draw(test_files, fake_files, n_real, n_fake, seed)
    study_id = secrets.token_hex(8)  # random: two studies never share a reader's stored answers
    meta = {
        "format": FORMAT_VERSION,
        "study_id": study_id,
        "dataset": dataset,
        "model": model,
        "scale": cfg.scale,
        "seed": seed,
        "n_real": n_real,
        "n_fake": n_fake,
        "real_source": str(manifest),
        "fake_source": str(samples),
        "created_by": f"vmddpm {__version__}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_kit(out, ids, items, meta, cfg.root)
    log.info(
        "reader study %s: %d real + %d synthetic images (seed %d) -> %s; give readers %s, keep %s private",
        study_id,
        n_real,
        n_fake,
        seed,
        out,
        out / READER_DIR,
        out / KEY_CSV,
    )
    return out


def score_study(cfg: Config, study: str | Path, answers: Sequence[str | Path]) -> Path:
    """Score readers' answer files against the sealed key of `study`; write `scores.json`,
    `summary.md` and `scores.png` into the study folder and return the path of `scores.json`.

    Every file is validated first (the key against its recorded sha256; each answer file against
    the study's ids), so a wrong input stops with a message naming the file and rows instead of
    silently producing a plausible-looking score. `cfg` is not read: the study folder records
    everything scoring needs, so a study scores the same under any params.yaml.
    """
    folder = Path(study)
    if folder.name == STUDY_JSON:
        folder = folder.parent
    meta = read_study(folder)
    key = read_key(folder, meta)
    readers = [read_answers(Path(p), meta) for p in answers]
    if not readers:
        raise UserError("no answer files given: pass --answers A.csv [B.csv ...]")
    seen: dict[str, Path] = {}
    for r in readers:
        if r.reader in seen:
            raise UserError(
                f"{r.path}: reader '{r.reader}' also answered in {seen[r.reader]}; one file per reader"
            )
        seen[r.reader] = r.path

    ids = meta["images"]
    per_reader = [reader_scores(r, key) for r in readers]
    agreement = agreement_scores([r.reader for r in readers], [[r.answers[i] for i in ids] for r in readers])
    scores = {
        "format": FORMAT_VERSION,
        "study_id": meta["study_id"],
        "dataset": meta["dataset"],
        "model": meta["model"],
        "scale": meta.get("scale"),
        "seed": meta["seed"],
        "n_real": meta["n_real"],
        "n_fake": meta["n_fake"],
        "key_sha256": meta["key_sha256"],
        "positive_class": SYNTHETIC,
        "chance": CHANCE,
        "readers": per_reader,
        "agreement": agreement,
        "scored_by": f"vmddpm {__version__}",
        "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    scores_figure(scores, folder / "scores.png")
    vio.write_text(folder / "summary.md", summary_markdown(scores))
    path = vio.write_json(folder / "scores.json", json_safe(scores))  # last: it marks a finished scoring
    for r in per_reader:
        log.info(
            "reader %s: accuracy %.3f (binomial p=%.3g vs %.1f), sensitivity %s, specificity %s",
            r["reader"],
            r["accuracy"],
            r["binom_p"],
            CHANCE,
            fmt(r["sensitivity"]),
            fmt(r["specificity"]),
        )
    if agreement["method"]:
        log.info(
            "agreement (%s kappa, %d readers): %s",
            agreement["method"],
            len(readers),
            fmt(agreement["kappa"]),
        )
    log.info("summary: %s", folder / "summary.md")
    return path
