"""`vmddpm prepare`: a dataset's raw tree -> uint8 PNG slices + `manifest.csv` with subject-level splits.

Why these choices:
- splits are drawn over *subjects* (patients), seeded by `seed`, never over slices: neighbouring slices
  of one volume are near-duplicates, so a slice-level split would leak the test set into training
  and flatter every FID;
- slices are stored as 8-bit grayscale PNGs because that is exactly what FID reads, so the real set
  and the generated set go through the same decoder;
- the whole output is built in a temporary folder and renamed into place with `prepare.json` (the
  fingerprint of every input and knob). A second run with the same inputs is a no-op; an interrupted
  run leaves the previous output (or nothing) and a rerun completes; a bad input raises a one-line
  UserError and leaves finished outputs untouched.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image
from tqdm import tqdm

from vmddpm import io
from vmddpm.config import Config
from vmddpm.errors import UserError

log = logging.getLogger(__name__)

COLUMNS = ("file", "subject", "split", "source", "slice")
SPLITS = ("train", "val", "test")
DONE = "prepare.json"
VERSION = 1


@dataclass(frozen=True)
class Subject:
    """One patient/subject: its id (the split unit) and the raw files its slices come from."""

    id: str
    files: tuple[Path, ...]


def reader(dataset: str) -> ModuleType:
    """The raw-layout reader of `dataset`: `subjects(root, cfg)` and `slices(subject, root, cfg)`."""
    from vmddpm.data import acdc, brats, chestxray

    return {"chestxray": chestxray, "brats2018": brats, "acdc": acdc}[dataset]


def split_subjects(ids: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Seeded assignment of subject ids to train/val/test; every split with a share > 0 gets one
    subject at least (when there are enough), and the result does not depend on the input order."""
    ids = sorted(set(ids))
    n = len(ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    counts = {s: round(n * fractions[s]) for s in ("val", "test")}
    for s in counts:
        if fractions[s] > 0 and counts[s] == 0 and n >= 3:
            counts[s] = 1
    n_train = n - counts["val"] - counts["test"]
    if n_train < 1:
        raise UserError(f"data.split: {n} subjects leave none for training; add data or lower val/test")
    out = {sid: "train" for sid in order[:n_train]}
    out.update({sid: "val" for sid in order[n_train : n_train + counts["val"]]})
    out.update({sid: "test" for sid in order[n_train + counts["val"] :]})
    return out


def _fingerprint(cfg: Config, dataset: str, root: Path) -> dict[str, object]:
    from vmddpm.data.download import MARKER

    dcfg = asdict(cfg.dataset(dataset))
    for k in ("source", "archive", "raw_dir", "url"):
        dcfg.pop(k)
    marker = next((p / MARKER for p in (root, *root.parents) if (p / MARKER).is_file()), None)
    raw = json.loads(marker.read_text())["sha256"] if marker else str(root)
    return {
        "version": VERSION,
        "dataset": dataset,
        "image_size": cfg.data.image_size,
        "split": asdict(cfg.data.split),
        "seed": cfg.seed,
        "knobs": dcfg,
        "raw": raw,
    }


def _png(img: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def prepare_dataset(cfg: Config, dataset: str) -> Path:
    """`vmddpm prepare --dataset D`: write `cfg.prepared_dir(D)`; returns it."""
    from vmddpm.data.download import raw_tree

    cfg.dataset(dataset)
    root = raw_tree(cfg, dataset)
    out = cfg.prepared_dir(dataset)
    fp = _fingerprint(cfg, dataset, root)
    done = out / DONE
    if done.is_file() and (out / "manifest.csv").is_file():
        try:
            same = json.loads(done.read_text()).get("fingerprint") == fp
        except json.JSONDecodeError:
            same = False
        if same:
            log.info("%s: already prepared in %s (same raw data and knobs)", dataset, out)
            return out

    mod = reader(dataset)
    subjects = mod.subjects(root, cfg)
    limit = cfg.dataset(dataset).max_subjects
    if limit and len(subjects) > limit:
        keep = set(np.random.default_rng([cfg.seed, 1]).permutation(len(subjects))[:limit].tolist())
        subjects = [s for i, s in enumerate(subjects) if i in keep]
    assign = split_subjects([s.id for s in subjects], asdict(cfg.data.split), cfg.seed)

    tmp = out.parent / f".{out.name}.partial"
    old = out.parent / f".{out.name}.old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        rows = _write_slices(mod, subjects, assign, root, cfg, tmp, dataset)
        if not rows:
            raise UserError(
                f"{root}: no slices came out of {len(subjects)} subjects; check the raw data and knobs"
            )
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        io.write_text(tmp / "manifest.csv", buf.getvalue())
        counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
        subj = {s: len({r["subject"] for r in rows if r["split"] == s}) for s in SPLITS}
        io.write_json(
            tmp / DONE, {"fingerprint": fp, "slices": counts, "subjects": subj, "raw_root": str(root)}
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("%s: prepared %s slices (subjects %s) in %s", dataset, counts, subj, out)
    return out


def _write_slices(
    mod: ModuleType,
    subjects: list[Subject],
    assign: dict[str, str],
    root: Path,
    cfg: Config,
    tmp: Path,
    dataset: str,
) -> list[dict[str, object]]:
    for s in SPLITS:
        (tmp / s).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for subject in tqdm(subjects, desc=f"prepare {dataset}", unit="subject", leave=False):
        split = assign[subject.id]
        it: Iterator[tuple[str, int, np.ndarray]] = mod.slices(subject, root, cfg)
        for n, (source, k, img) in enumerate(it):
            rel = f"{split}/{_safe(subject.id)}_{n:04d}.png"
            (tmp / rel).write_bytes(_png(img))  # the folder is renamed into place only when complete
            rows.append({"file": rel, "subject": subject.id, "split": split, "source": source, "slice": k})
    return rows
