"""Shared pieces of the three dataset readers: the `Subject` they yield, NIfTI loading, normalisation,
crop + resize.

Why one place: ChestXRay, BraTS and ACDC must end up identical in form (square uint8 slices at
`data.image_size`, resampled the same way), and every read error must become the same kind of
one-line UserError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vmddpm.errors import UserError


@dataclass(frozen=True)
class Subject:
    """One patient/subject: its id (the split unit) and the raw files its slices come from."""

    id: str
    files: tuple[Path, ...]


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_nifti(path: Path, ndim: int = 3) -> np.ndarray:
    """Voxel array of a NIfTI file as float32, with exactly `ndim` dimensions (trailing 1s dropped)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel/gzip/zlib raise many types for a damaged file
        raise UserError(
            f"{path}: cannot read NIfTI ({one_line(e)}); the file is corrupt, extract it again "
            "(`vmddpm download`) or replace it"
        ) from None
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise UserError(
            f"{path}: NIfTI has shape {tuple(data.shape)} ({data.ndim}-D), expected a {ndim}-D volume; "
            "replace it with the official file"
        )
    if not np.isfinite(data).all():
        raise UserError(f"{path}: NIfTI contains NaN or infinite values; replace it with the official file")
    return data


def percentile_scale(vol: np.ndarray, mask: np.ndarray | None, percentiles: list[float]) -> np.ndarray:
    """Map [p_lo, p_hi] percentiles (over `mask`, or all voxels) of a volume to [0, 1], clipped."""
    values = vol[mask] if mask is not None else vol.ravel()
    if values.size == 0:
        return np.zeros_like(vol, dtype=np.float32)
    lo, hi = np.percentile(values, [percentiles[0], percentiles[-1]])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((vol - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop a 2-D float image in [0, 1] to a square and resize it to `size` (antialiased)."""
    h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.ascontiguousarray(img[top : top + s, left : left + s], dtype=np.float32)
    if s != size:
        crop = np.asarray(Image.fromarray(crop, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(np.rint(crop * 255.0), 0, 255).astype(np.uint8)


def axial(vol: np.ndarray, k: int) -> np.ndarray:
    """Slice k along the last axis, as an image (rows = y, columns = x) in radiological display."""
    return np.rot90(vol[:, :, k])
