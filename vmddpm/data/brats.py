"""BraTS2018: `MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/<id>/<id>_<modality>.nii.gz` -> axial slices.

One modality (`data.brats2018.modality`, default flair) per subject; the volume is normalised once
(percentiles over its brain voxels, i.e. the non-zero ones: BraTS is skull-stripped with background
exactly 0), so every slice of a subject shares one intensity scale. Only axial slices whose brain
covers at least `min_brain_fraction` of the slice are kept: empty slices would teach the model to draw
black squares and inflate FID agreement.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vmddpm.config import Config
from vmddpm.data.imaging import Subject, axial, load_nifti, percentile_scale, square_resize
from vmddpm.errors import UserError

GRADES = ("HGG", "LGG")
MODALITIES = ("t1", "t1ce", "t2", "flair")


def _volume(folder: Path, modality: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{folder.name}_{modality}{ext}"
        if p.is_file():
            return p
    return None


def subjects(root: Path, cfg: Config) -> list[Subject]:
    grades = [root / g for g in GRADES if (root / g).is_dir()]
    if not grades:
        raise UserError(f"{root}: no HGG/ or LGG/ folder; expected the official BraTS2018 training layout")
    out = []
    for grade in grades:
        for folder in sorted(p for p in grade.iterdir() if p.is_dir()):
            for m in MODALITIES:
                if _volume(folder, m) is None:
                    raise UserError(
                        f"{folder / f'{folder.name}_{m}.nii.gz'}: missing (subject {folder.name} lacks "
                        f"the {m} modality); extract the archive again (`vmddpm download`) or remove the "
                        "subject folder"
                    )
            path = _volume(folder, cfg.data.brats2018.modality)
            assert path is not None
            out.append(Subject(folder.name, (path,)))
    if not out:
        raise UserError(f"{root}: no subject folders under HGG/ or LGG/; rerun `vmddpm download`")
    return out


def slices(subject: Subject, root: Path, cfg: Config) -> Iterator[tuple[str, int, np.ndarray]]:
    bc = cfg.data.brats2018
    (path,) = subject.files
    vol = load_nifti(path, ndim=3)
    brain = vol > 0
    scaled = percentile_scale(vol, brain, bc.percentiles)
    frac = brain.mean(axis=(0, 1))
    rel = path.relative_to(root.parent).as_posix()
    for k in range(vol.shape[2]):
        if frac[k] >= bc.min_brain_fraction:
            yield rel, k, square_resize(axial(scaled, k), cfg.data.image_size)
