"""Raw tree -> uint8 PNG slices + `manifest.csv` with subject-level splits: the pieces of the prepare
stage (`vmddpm.stages.prepare`).

Why these choices:
- splits are drawn over *subjects* (patients), seeded by `seed`, never over slices: neighbouring slices
  of one volume are near-duplicates, so a slice-level split would leak the test set into training
  and flatter every FID;
- slices are stored as 8-bit grayscale PNGs because that is exactly what FID reads, so the real set
  and the generated set go through the same decoder;
- the whole output is built in a temporary folder and renamed into place (`vmddpm.io.build_folder`)
  with `prepare.json` (the fingerprint of every input and knob). A second run with the same inputs
  is a no-op; an interrupted run leaves the previous output (or nothing) and a rerun completes; a bad
  input raises a one-line UserError and leaves finished outputs untouched.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image
from tqdm import tqdm

from vmddpm import io
from vmddpm.config import Config
from vmddpm.contracts import MANIFEST, MANIFEST_COLUMNS, SPLITS
from vmddpm.data.imaging import Subject
from vmddpm.errors import UserError

log = logging.getLogger(__name__)

DONE = "prepare.json"
VERSION = 2  # 2: the raw tree by its files


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


def tree_digest(root: Path, mtimes: bool) -> dict[str, object]:
    """The files of a raw tree by name and size (and modification time): a deleted, added, truncated or
    rewritten file changes the digest; reading the bytes of a 10 GB tree is not needed for that."""
    h = hashlib.sha256()
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        st = p.stat()
        stamp = f"\t{st.st_mtime_ns}" if mtimes else ""
        h.update(f"{p.relative_to(root).as_posix()}\t{st.st_size}{stamp}\n".encode())
        n += 1
    return {"files": n, "sha256": h.hexdigest(), "mtimes": mtimes}


def fingerprint(cfg: Config, dataset: str, root: Path) -> dict[str, object]:
    """Every input and knob the prepared output depends on: the knobs, and the raw tree by its files
    (plus the archive's sha256 for a download; modification times too for a placed `raw_dir`, whose
    files no checksum vouches for). Not the tree's path: a moved tree is the same data."""
    from vmddpm.data.download import MARKER

    dcfg = asdict(cfg.dataset(dataset))
    placed = bool(dcfg["raw_dir"])
    for k in ("source", "archive", "raw_dir", "url"):
        dcfg.pop(k)
    marker = next((p / MARKER for p in (root, *root.parents) if (p / MARKER).is_file()), None)
    if marker and not placed:  # extracted by `vmddpm download`: its checkout by DVC may change mtimes, not contents
        raw: object = {"archive_sha256": json.loads(marker.read_text())["sha256"], **tree_digest(root, False)}
    else:
        raw = tree_digest(root, True)
    return {
        "version": VERSION,
        "dataset": dataset,
        "image_size": cfg.data.image_size,
        "split": asdict(cfg.data.split),
        "seed": cfg.seed,
        "knobs": dcfg,
        "raw": raw,
    }


def png(img: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_manifest(folder: Path, rows: list[dict[str, object]]) -> None:
    """`manifest.csv` (`vmddpm.contracts.MANIFEST_COLUMNS`), atomically."""
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    io.write_text(folder / MANIFEST, buf.getvalue())


def write_slices(
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
            rel = f"{split}/{safe_name(subject.id)}_{n:04d}.png"
            (tmp / rel).write_bytes(png(img))  # the folder is renamed into place only when complete
            rows.append({"file": rel, "subject": subject.id, "split": split, "source": source, "slice": k})
    return rows
