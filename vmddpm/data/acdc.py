"""ACDC: `database/{training,testing}/patientNNN/` -> short-axis slices of the ED and ES frames.

`Info.cfg` names the end-diastolic (ED) and end-systolic (ES) frames; the matching
`patientNNN_frameXX.nii.gz` volumes are read, each normalised on its own (percentiles over all
voxels: cine MRI has no fixed intensity scale), and every short-axis slice is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vmddpm.config import Config
from vmddpm.data.imaging import Subject, axial, load_nifti, percentile_scale, square_resize
from vmddpm.errors import UserError

FOLDERS = ("training", "testing")


def read_info(path: Path) -> dict[str, str]:
    """`Key: value` lines of an Info.cfg; ED and ES must be there and be frame numbers."""
    if not path.is_file():
        raise UserError(
            f"{path}: missing; every ACDC patient folder has an Info.cfg (rerun `vmddpm download`)"
        )
    info = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit() or int(info[key]) < 1:
            raise UserError(
                f"{path}: {key} is missing or not a frame number (got {info.get(key)!r}); "
                "restore the official Info.cfg (keys ED, ES, Group, Height, NbFrame, Weight)"
            )
    return info


def subjects(root: Path, cfg: Config) -> list[Subject]:
    out = []
    for folder in (root / f for f in FOLDERS):
        if not folder.is_dir():
            continue
        for patient in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("patient")):
            info = read_info(patient / "Info.cfg")
            frames = []
            for key in ("ED", "ES"):
                f = patient / f"{patient.name}_frame{int(info[key]):02d}.nii.gz"
                if not f.is_file():
                    raise UserError(
                        f"{f}: missing ({key} frame named by {patient / 'Info.cfg'}); rerun `vmddpm download`"
                    )
                frames.append(f)
            out.append(Subject(patient.name, tuple(dict.fromkeys(frames))))
    if not out:
        raise UserError(
            f"{root}: no training/ or testing/ patientNNN folders; expected the official ACDC layout"
        )
    return out


def slices(subject: Subject, root: Path, cfg: Config) -> Iterator[tuple[str, int, np.ndarray]]:
    for path in subject.files:
        vol = load_nifti(path, ndim=3)
        scaled = percentile_scale(vol, None, cfg.data.acdc.percentiles)
        rel = path.relative_to(root.parent).as_posix()
        for k in range(vol.shape[2]):
            yield rel, k, square_resize(axial(scaled, k), cfg.data.image_size)
