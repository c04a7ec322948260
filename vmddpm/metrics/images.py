"""Folders of generated or real images as the evaluation reads them: uint8 grayscale PNGs of one size.

Every problem (a stray file, an unreadable image, a colour image, mixed sizes, too few images) is a
one-line UserError naming the folder and the file. An `ImageSet` carries a digest of its file names and
bytes, the key of the reference-feature cache (`vmddpm.evalkit`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vmddpm.errors import UserError

IMAGE_SUFFIXES = (".png",)


@dataclass
class ImageSet:
    """A validated set of uint8 grayscale images (N x H x W) and the digest of their bytes."""

    folder: Path
    files: list[Path]
    pixels: np.ndarray
    digest: str

    def __len__(self) -> int:
        return len(self.files)


def list_images(folder: Path) -> list[Path]:
    """The PNGs of `folder`, sorted; anything else (but hidden files) is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: no such folder of images; run the stage that writes it or pass another path"
        )
    files, other = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):  # atomic-write temp files, .DS_Store
            continue
        (files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES else other).append(p)
    if other:
        names = ", ".join(p.name for p in other[:3]) + (" ..." if len(other) > 3 else "")
        raise UserError(
            f"{folder}: {len(other)} entries are not PNG images ({names}); "
            "the folder must hold only the uint8 grayscale PNGs to evaluate: move the others out"
        )
    if not files:
        raise UserError(
            f"{folder}: contains no PNG images; run the stage that writes them or pass another folder"
        )
    return files


def load_images(files: Sequence[Path], folder: Path, what: str) -> ImageSet:
    """Decode `files` as 8-bit grayscale images of one size; every problem is a UserError naming it."""
    folder = Path(folder)
    if not files:
        raise UserError(f"{folder}: no {what} images; run the stage that writes them or pass another folder")
    arrays, h = [], hashlib.sha256()
    size: tuple[int, int] | None = None
    for f in tqdm(files, desc=f"read {what}", unit="img", disable=len(files) < 500, leave=False):
        try:
            data = Path(f).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                mode, im_size = im.mode, im.size
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(
                f"{folder}: {Path(f).name} is not a readable image ({e}); remove or replace it"
            ) from None
        if mode != "L":
            raise UserError(
                f"{folder}: {Path(f).name} has mode {mode}; the protocol needs 8-bit grayscale (mode L) PNGs"
            )
        if size is None:
            size = im_size
        elif im_size != size:
            raise UserError(
                f"{folder}: mixed image sizes ({Path(f).name} is {im_size[0]}x{im_size[1]}, "
                f"{Path(files[0]).name} is {size[0]}x{size[1]}); all images must have one size"
            )
        h.update(Path(f).name.encode())
        h.update(hashlib.sha256(data).digest())
        arrays.append(arr)
    return ImageSet(folder, list(files), np.stack(arrays), h.hexdigest())


def load_folder(folder: Path, what: str, limit: int = 0) -> ImageSet:
    files = list_images(folder)
    if limit:
        if len(files) < limit:
            raise UserError(
                f"{folder}: holds {len(files)} images but eval.n_fake asks for {limit}; "
                "generate more (sample.n_images) or lower eval.n_fake"
            )
        files = files[:limit]
    return load_images(files, folder, what)
