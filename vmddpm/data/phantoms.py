"""Deterministic synthetic raw data in each dataset's exact official layout and archive format.

Why: the demo scale must run the whole pipeline on any machine without the (large, partly gated)
real data, and it must exercise the *same* download/verify/extract/prepare code. So the phantoms are
not tensors but files: real JPEGs in the Kermany tree, NIfTI volumes with proper affines in the
BraTS and ACDC trees (with `Info.cfg`, 4-D volumes, frames and `_gt` masks), packed into a zip named
like the official one. Bytes are reproducible (fixed seeds, fixed zip timestamps, gzip mtime 0), so
the archive's sha256 is stable and the download step can verify it like any other.

Anatomy is deliberately simple but structured (lungs, a skull with a brain and a tumour blob, heart
rings that contract between ED and ES) with per-subject variation, so the slices are not trivial.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from vmddpm import io
from vmddpm.config import Config
from vmddpm.data.sources import SOURCES

log = logging.getLogger(__name__)

MARKER = ".vmddpm-phantoms.json"
VERSION = 1
ZIP_TIME = (2018, 1, 1, 0, 0, 0)


# ------------------------------------------------------------------------------------------ helpers
def _rng(cfg: Config, dataset: str, *ids: int) -> np.random.Generator:
    """A generator seeded by (seed, dataset, ids): subjects are independent of each other's count."""
    tag = int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:4], "little")
    return np.random.default_rng([cfg.seed, tag, VERSION, *ids])


def _nifti(data: np.ndarray, affine: np.ndarray, zooms: tuple[float, ...] | None = None) -> bytes:
    """A .nii.gz file's bytes (gzip mtime 0, so the bytes depend only on the data)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if zooms is not None:
        img.header.set_zooms(zooms)
    img.header["xyzt_units"] = 10  # mm, s
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _jpeg(img: np.ndarray) -> bytes:
    buf = BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Low-frequency texture: coarse noise upsampled (cheap, no scipy needed)."""
    coarse = rng.standard_normal(tuple(max(2, s // scale) for s in shape)).astype(np.float32)
    reps = [int(np.ceil(s / c)) for s, c in zip(shape, coarse.shape, strict=False)]
    up = coarse
    for ax, r in enumerate(reps):
        up = np.repeat(up, r, axis=ax)
    return up[tuple(slice(0, s) for s in shape)]


# ---------------------------------------------------------------------------------------- ChestXRay
def _chestxray(cfg: Config) -> Iterator[tuple[str, bytes]]:
    p = cfg.data.phantoms
    for i in range(p.chestxray_subjects):
        rng = _rng(cfg, "chestxray", i)
        pneumonia = i % 4 != 0  # the official set is about 3:1 PNEUMONIA:NORMAL
        cls = "PNEUMONIA" if pneumonia else "NORMAL"
        folder = "test" if i % 6 == 5 else "train"
        kind = "bacteria" if i % 2 else "virus"
        h = p.size
        w = round(p.size * rng.uniform(1.1, 1.4))  # real films are wider than tall, sizes vary
        lung_w, lung_h = rng.uniform(0.17, 0.23), rng.uniform(0.30, 0.38)
        shift = rng.uniform(-0.04, 0.04, 2)
        for k in range(int(rng.integers(1, 4))):
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            y, x = yy / h - 0.5 - shift[0], xx / w - 0.5 - shift[1]
            img = 40 + 10 * _smooth_noise(rng, (h, w), 8)
            body = (x / 0.45) ** 2 + (y / 0.6) ** 2 < 1
            img += body * 120
            for side in (-1, 1):
                lung = ((x - side * 0.2) / lung_w) ** 2 + ((y + 0.02) / lung_h) ** 2 < 1
                img -= lung * 85
            heart = ((x + 0.05) / 0.13) ** 2 + ((y - 0.15) / 0.15) ** 2 < 1
            img += heart * 70
            spine = np.abs(x) < 0.035
            img += spine * body * 50
            for r in range(6):  # ribs: faint arcs
                img += 18 * (np.abs(y - (-0.28 + 0.1 * r) - 0.25 * x**2) < 0.012) * body
            if pneumonia:  # opacities: bright blobs inside a lung
                for _ in range(int(rng.integers(2, 5))):
                    cy, cx = rng.uniform(-0.2, 0.25), rng.choice([-1, 1]) * rng.uniform(0.12, 0.27)
                    sig = rng.uniform(0.03, 0.08)
                    img += 70 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sig**2))
            img += rng.normal(0, 4, img.shape)
            if pneumonia:
                name = f"person{i + 1}_{kind}_{k + 1}.jpeg"
            else:
                name = f"IM-{1000 + i:04d}-{k + 1:04d}.jpeg"
            yield f"chest_xray/{folder}/{cls}/{name}", _jpeg(img)


# ---------------------------------------------------------------------------------------- BraTS2018
def _brats_id(i: int) -> str:
    letters = "".join(chr(ord("A") + (i // 26**j) % 26) for j in (2, 1, 0))
    return f"Brats18_CBICA_{letters}_1"


def _brats(cfg: Config) -> Iterator[tuple[str, bytes]]:
    p = cfg.data.phantoms
    s, d = p.size, p.depth
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, s - 1.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    for i in range(p.brats2018_subjects):
        rng = _rng(cfg, "brats2018", i)
        grade = "LGG" if i % 4 == 3 else "HGG"
        sid = _brats_id(i)
        x, y, z = np.meshgrid(
            np.linspace(-1, 1, s, dtype=np.float32),
            np.linspace(-1, 1, s, dtype=np.float32),
            np.linspace(-1, 1, d, dtype=np.float32),
            indexing="ij",
        )
        ax, ay, az = 0.72 * rng.uniform(0.92, 1.05), 0.85 * rng.uniform(0.92, 1.05), 0.85
        r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2)
        brain = r < 0.9
        skull = (r >= 0.92) & (r < 1.0)
        vent = ((x / 0.12) ** 2 + (y / 0.3) ** 2 + (z / 0.35) ** 2) < 1
        c = rng.uniform(-0.35, 0.35, 3) * np.array([ax, ay, az])
        rad = rng.uniform(0.15, 0.28) * (0.7 if grade == "LGG" else 1.0)
        rt = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / rad
        core, edema = brain & (rt < 0.6), brain & (rt < 1.0)
        enh = brain & (rt >= 0.45) & (rt < 0.6) & (grade == "HGG")
        tex = _smooth_noise(rng, (s, s, d), 6)
        seg = np.zeros((s, s, d), np.uint8)
        seg[edema], seg[core], seg[enh] = 2, 1, 4
        # (brain, ventricles, edema, core, enhancing, skull) intensities per modality
        table = {
            "t1": (500, 250, 420, 350, 380, 160),
            "t1ce": (520, 260, 450, 330, 900, 170),
            "t2": (400, 900, 700, 800, 750, 120),
            "flair": (420, 150, 800, 650, 700, 100),
        }
        for mod, (b, v, e, co, en, sk) in table.items():
            vol = np.zeros((s, s, d), np.float32)
            vol[brain] = b
            vol[brain & vent] = v
            vol[edema] = e
            vol[core] = co
            vol[enh] = en
            vol[skull] = sk
            vol += (brain | skull) * (25 * tex + rng.normal(0, 8, vol.shape)).astype(np.float32)
            vol = np.where(brain | skull, np.maximum(vol, 1), 0).astype(np.int16)
            yield f"MICCAI_BraTS_2018_Data_Training/{grade}/{sid}/{sid}_{mod}.nii.gz", _nifti(vol, affine)
        yield f"MICCAI_BraTS_2018_Data_Training/{grade}/{sid}/{sid}_seg.nii.gz", _nifti(seg, affine)


# --------------------------------------------------------------------------------------------- ACDC
ACDC_GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")


def _acdc(cfg: Config) -> Iterator[tuple[str, bytes]]:
    p = cfg.data.phantoms
    n, nz, nt = p.acdc_subjects, p.acdc_slices, p.acdc_frames
    n_train = int(np.ceil(n * 2 / 3))  # official: 100 training, 50 testing
    yield "database/MANDATORY_CITATION.md", (SOURCES["acdc"].citation + "\n").encode()
    for i in range(n):
        rng = _rng(cfg, "acdc", i)
        folder = "training" if i < n_train else "testing"
        pid = f"patient{i + 1 if i < n_train else 101 + i - n_train:03d}"  # official: testing is 101-150
        h, w = p.size, round(p.size * rng.uniform(1.05, 1.25))  # real frames are not square
        ed, es = 1, int(np.clip(round(nt * rng.uniform(0.3, 0.45)), 2, nt))
        group = ACDC_GROUPS[i % len(ACDC_GROUPS)]
        info = (
            f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: {rng.uniform(150, 195):.1f}\n"
            f"NbFrame: {nt}\nWeight: {rng.uniform(50, 110):.1f}\n"
        )
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        cy, cx = h * rng.uniform(0.42, 0.55), w * rng.uniform(0.42, 0.55)
        body = ((xx - w / 2) / (0.46 * w)) ** 2 + ((yy - h / 2) / (0.4 * h)) ** 2 < 1
        r_ed = h * rng.uniform(0.10, 0.14)
        wall = h * rng.uniform(0.04, 0.06) * (1.5 if group == "HCM" else 1.0)
        if group == "DCM":
            r_ed *= 1.3
        tex = _smooth_noise(rng, (h, w), 6)
        cine = np.zeros((h, w, nz, nt), np.float32)
        gts: dict[int, np.ndarray] = {ed: np.zeros((h, w, nz), np.uint8), es: np.zeros((h, w, nz), np.uint8)}
        for t in range(nt):
            f = t + 1  # frames are 1-based: systole peaks at ES, then the ventricle relaxes
            if f <= es:
                phase = np.sin(np.pi / 2 * (f - 1) / max(es - 1, 1))
            else:
                phase = np.cos(np.pi / 2 * (f - es) / max(nt - es + 1, 1))
            contraction = 1 - (0.2 if group == "DCM" else 0.35) * phase
            for k in range(nz):
                taper = 1 - 0.5 * k / max(nz - 1, 1)  # base -> apex
                r = r_ed * taper * contraction
                dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
                lv = dist < r
                myo = (dist >= r) & (dist < r + wall * (1 + 0.3 * phase))
                rv = (
                    (np.sqrt((xx - cx + 1.6 * r_ed * taper) ** 2 + (yy - cy) ** 2) < 1.1 * r * taper)
                    & ~lv
                    & ~myo
                )
                img = 40 * body + 8 * tex * body
                img = np.where(lv | rv, 220.0, img)
                img = np.where(myo, 70.0, img)
                cine[:, :, k, t] = img + rng.normal(0, 5, img.shape)
                if t + 1 in gts:
                    g = gts[t + 1][:, :, k]
                    g[rv], g[myo], g[lv] = 1, 2, 3
        cine = np.clip(cine, 0, None).astype(np.int16)
        # NIfTI axes are (x, y, z[, t]): store columns first, as the official files do
        vol4 = np.ascontiguousarray(cine.transpose(1, 0, 2, 3))
        zooms = (1.5, 1.5, 10.0)
        affine = np.diag([*zooms, 1.0])
        base = f"database/{folder}/{pid}"
        yield f"{base}/Info.cfg", info.encode()
        yield f"{base}/{pid}_4d.nii.gz", _nifti(vol4, affine, (*zooms, 1.0))
        for f in (ed, es):
            yield (
                f"{base}/{pid}_frame{f:02d}.nii.gz",
                _nifti(np.ascontiguousarray(vol4[..., f - 1]), affine, zooms),
            )
            gt = np.ascontiguousarray(gts[f].transpose(1, 0, 2))
            yield f"{base}/{pid}_frame{f:02d}_gt.nii.gz", _nifti(gt, affine, zooms)


GENERATORS = {"chestxray": _chestxray, "brats2018": _brats, "acdc": _acdc}


# -------------------------------------------------------------------------------------------- entry
def write_phantoms(cfg: Config, dataset: str, out: Path, archive: bool = True) -> Path:
    """`vmddpm phantoms`: write the phantom raw tree (and the official-style zip) under `out`.

    Returns the archive path (or the tree root with `archive=False`). Idempotent: a second call with
    the same knobs finds the marker and returns at once.
    """
    cfg.dataset(dataset)
    src = SOURCES[dataset]
    out = Path(out)
    knobs = {"version": VERSION, "seed": cfg.seed, "dataset": dataset, **asdict(cfg.data.phantoms)}
    target = out / src.archive if archive else out / src.root
    marker = out / MARKER
    if marker.is_file() and target.exists() and json.loads(marker.read_text()).get("knobs") == knobs:
        log.info("%s phantoms already in %s", dataset, out)
        return target
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    io.remove_stale_temps(out / src.root, ("partial",))
    tmp_tree = Path(tempfile.mkdtemp(prefix=io.temp_prefix(out / src.root, "partial"), dir=out))
    files = 0
    with io.atomic_path(out / src.archive) if archive else contextlib.nullcontext() as zpath:
        zf = zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) if zpath else None
        try:
            for rel, data in GENERATORS[dataset](cfg):
                dest = tmp_tree / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                if zf is not None:
                    info = zipfile.ZipInfo(rel, date_time=ZIP_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, data)
                files += 1
        finally:
            if zf is not None:
                zf.close()
    tree = out / src.root
    if tree.exists():
        shutil.rmtree(tree)
    os.replace(tmp_tree / src.root, tree)
    shutil.rmtree(tmp_tree)
    io.write_json(marker, {"knobs": knobs, "files": files})
    log.info("wrote %d %s phantom files to %s%s", files, dataset, tree, f" and {target}" if archive else "")
    return target
