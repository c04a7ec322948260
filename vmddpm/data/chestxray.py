"""ChestXRay (Kermany et al. 2018): the JPEG tree -> square grayscale slices.

Raw layout: `chest_xray/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg`. The official train/test
folders are ignored for splitting: we re-split by patient (the patient id is in the file name:
`person<N>_...` for PNEUMONIA, `IM-<N>-<k>` / `NORMAL2-IM-<N>-<k>` for NORMAL), so no patient's
films land in two splits. Each film becomes one slice: decode, grayscale, centre crop, resize.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vmddpm.config import Config
from vmddpm.data.imaging import Subject, one_line, square_resize
from vmddpm.errors import UserError

CLASSES = ("NORMAL", "PNEUMONIA")
SUFFIXES = (".jpeg", ".jpg", ".png")
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


def patient_id(cls: str, name: str) -> str:
    """The patient of a film from its official file name (falls back to the file name itself)."""
    m = _PERSON.match(name) or _NORMAL.match(name)
    return f"{cls}-{m.group(1) if m else Path(name).stem}"


def subjects(root: Path, cfg: Config) -> list[Subject]:
    files: dict[str, list[Path]] = {}
    for path in sorted(root.glob("*/*/*")):
        cls = path.parent.name.upper()
        if cls not in CLASSES or path.suffix.lower() not in SUFFIXES or path.name.startswith("._"):
            continue
        files.setdefault(patient_id(cls, path.name), []).append(path)
    if not files:
        raise UserError(
            f"{root}: no JPEG films found; expected the official layout chest_xray/{{train,test}}/"
            "{NORMAL,PNEUMONIA}/*.jpeg (rerun `vmddpm download`)"
        )
    return [Subject(sid, tuple(paths)) for sid, paths in sorted(files.items())]


def load_film(path: Path) -> np.ndarray:
    """A film as float32 grayscale in [0, 1]; a damaged file is a UserError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            gray = im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(
            f"{path}: not a readable image ({one_line(e)}); the file is corrupt, extract the archive "
            "again (`vmddpm download`) or remove it"
        ) from None
    return np.asarray(gray, dtype=np.float32) / 255.0


def slices(subject: Subject, root: Path, cfg: Config) -> Iterator[tuple[str, int, np.ndarray]]:
    for path in subject.files:
        yield path.relative_to(root.parent).as_posix(), 0, square_resize(load_film(path), cfg.data.image_size)
