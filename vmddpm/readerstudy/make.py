"""Making a reader study kit: draw real and synthetic images, re-encode them blind, seal the key.

`draw` picks the images and their display order under a seed; `write_kit` writes the folder (see
`vmddpm.readerstudy`) through `vmddpm.io.build_folder`, so a crash leaves no half-made study and an
existing study (its key and the answers collected for it) is never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vmddpm import io as vio
from vmddpm.errors import UserError
from vmddpm.readerstudy.format import (
    IMAGES_DIR,
    KEY_COLUMNS,
    KEY_CSV,
    PAGE,
    READER_DIR,
    REAL,
    STUDY_JSON,
    SYNTHETIC,
)

log = logging.getLogger(__name__)


def occupied(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def refuse_existing(out: Path) -> None:
    if occupied(out):
        raise UserError(
            f"{out}: already exists and is not empty; a study is never overwritten (its key and the "
            "answers collected for it belong to it): choose another --out or remove it"
        )


def draw(
    real_pool: Sequence[Path], fake_pool: Sequence[Path], n_real: int, n_fake: int, seed: int
) -> tuple[list[str], list[tuple[str, Path]]]:
    """(image ids in display order, [(truth, source file)]): `n_real` + `n_fake` images drawn and
    shuffled under `seed`."""
    rng = np.random.default_rng(seed)
    real = [real_pool[i] for i in sorted(rng.choice(len(real_pool), n_real, replace=False))]
    fake = [fake_pool[i] for i in sorted(rng.choice(len(fake_pool), n_fake, replace=False))]
    items = [(REAL, p) for p in real] + [(SYNTHETIC, p) for p in fake]
    items = [items[i] for i in rng.permutation(len(items))]
    width = max(4, len(str(len(items))))
    ids = [f"img_{i + 1:0{width}d}" for i in range(len(items))]
    return ids, items


def write_kit(
    out: Path, ids: list[str], items: list[tuple[str, Path]], meta: dict[str, Any], root: Path
) -> dict[str, Any]:
    """Write the study folder `out`: reader images and page, the key and study.json (`meta` plus the
    ids and the key's sha256). Returns the study's meta."""
    try:
        with vio.build_folder(out, tag="tmp", replace=False) as tmp:
            looks: dict[str, set[tuple[str, tuple[int, int]]]] = {REAL: set(), SYNTHETIC: set()}
            for image_id, (truth, src) in zip(ids, items, strict=True):
                looks[truth].add(copy_png(src, tmp / READER_DIR / IMAGES_DIR / f"{image_id}.png"))
            if looks[REAL] != looks[SYNTHETIC]:
                log.warning(
                    "real images are %s but synthetic ones %s (mode, size): readers may tell them apart "
                    "by that alone",
                    sorted(looks[REAL]),
                    sorted(looks[SYNTHETIC]),
                )
            key_text = csv_text(
                KEY_COLUMNS,
                [(i, truth, display_path(src, root)) for i, (truth, src) in zip(ids, items, strict=True)],
            )
            vio.write_text(tmp / KEY_CSV, key_text)
            meta = {**meta, "images": ids, "key_sha256": hashlib.sha256(key_text.encode()).hexdigest()}
            vio.write_json(tmp / STUDY_JSON, meta)
            vio.write_text(tmp / READER_DIR / "index.html", page(meta))
    except OSError as e:
        if occupied(out):  # someone else wrote there meanwhile
            raise UserError(f"{out}: appeared while the study was being made; nothing written") from e
        raise
    return meta


def copy_png(src: Path, dst: Path) -> tuple[str, tuple[int, int]]:
    """Re-encode `src` as a PNG without metadata (text chunks, ICC profiles, names could leak the
    source); returns (mode, size) so the caller can warn when real and synthetic images differ."""
    try:
        with Image.open(src) as im:
            im.load()
            if im.mode not in ("1", "L", "LA", "I", "I;16", "RGB", "RGBA"):
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            clean = Image.frombytes(im.mode, im.size, im.tobytes())
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise UserError(f"{src}: cannot read the image ({e})") from None
    with vio.atomic_path(dst) as tmp:
        clean.save(tmp, format="PNG")
    return clean.mode, clean.size


def display_path(path: Path, root: Path) -> str:
    """Path relative to the project root when inside it (a key stays valid if the repo moves)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def csv_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def page(meta: dict[str, Any]) -> str:
    """The reader page with the study embedded: ids and relative image paths, never the key."""
    data = {
        "study_id": meta["study_id"],
        "title": f"Reader study: {meta['dataset']} ({len(meta['images'])} images)",
        "images": [{"id": i, "src": f"{IMAGES_DIR}/{i}.png"} for i in meta["images"]],
        "version": meta["created_by"],
    }
    # JSON inside <script>: escape <, > and & so no value can close the tag
    text = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = resources.files("vmddpm.readerstudy").joinpath(PAGE).read_text(encoding="utf-8")
    return template.replace("__STUDY_JSON__", text)
