"""Prepare stage on the phantom raw trees: counts, value range, size, splits, bad inputs, idempotency,
interruption (a real subprocess killed mid-run) and the real CLI."""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from vmddpm.data.prepare import split_subjects
from vmddpm.errors import UserError
from vmddpm.stages.download import download_dataset
from vmddpm.stages.prepare import prepare_dataset

SMALL = (
    "data.image_size=16",
    "data.phantoms.size=32",
    "data.phantoms.depth=10",
    "data.phantoms.acdc_slices=3",
    "data.phantoms.acdc_frames=4",
    "data.phantoms.chestxray_subjects=12",
    "data.phantoms.brats2018_subjects=6",
    "data.phantoms.acdc_subjects=6",
)


def manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def tree_state(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def expected_slices(cfg, dataset: str, raw: Path) -> int:
    """Counted independently from the raw files (not through the readers under test)."""
    p = cfg.data.phantoms
    if dataset == "chestxray":
        return len(list(raw.rglob("*.jpeg")))
    if dataset == "acdc":
        return p.acdc_subjects * 2 * p.acdc_slices  # ED and ES, every short-axis slice
    n = 0
    for f in raw.rglob(f"*_{cfg.data.brats2018.modality}.nii.gz"):
        vol = np.asarray(nib.load(f).dataobj)
        n += int(((vol > 0).mean(axis=(0, 1)) >= cfg.data.brats2018.min_brain_fraction).sum())
    return n


@pytest.mark.parametrize("dataset", ["chestxray", "brats2018", "acdc"])
def test_prepare_phantoms_counts_range_size_splits(make_cfg, dataset) -> None:
    cfg = make_cfg(*SMALL)
    raw = download_dataset(cfg, dataset)
    out = prepare_dataset(cfg, dataset)
    rows = manifest(out)
    assert len(rows) == expected_slices(cfg, dataset, raw)
    images = np.stack([np.asarray(Image.open(out / r["file"])) for r in rows])
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16)
    if dataset == "chestxray":  # films keep their own contrast
        assert int(images.max()) - int(images.min()) > 100
    else:  # per-volume percentile normalisation spans the full 8-bit range
        assert images.min() == 0 and images.max() == 255
    assert all(Image.open(out / r["file"]).mode == "L" for r in rows[:5])
    for r in rows:  # the source file exists in the raw tree and the slice index is in range
        assert (raw / r["source"]).is_file()
        assert 0 <= int(r["slice"]) < (1 if dataset == "chestxray" else cfg.data.phantoms.depth)
    splits: dict[str, set[str]] = {}
    for r in rows:
        splits.setdefault(r["subject"], set()).add(r["split"])
    assert all(len(v) == 1 for v in splits.values())
    n_subjects = {"chestxray": 12, "brats2018": 6, "acdc": 6}[dataset]
    assert len(splits) == n_subjects
    per_split = {s: sum(1 for v in splits.values() if s in v) for s in ("train", "val", "test")}
    assert per_split["val"] >= 1 and per_split["test"] >= 1 and per_split["train"] > per_split["test"]


def test_split_is_seeded_order_free_and_by_subject() -> None:
    ids = [f"s{i}" for i in range(20)]
    frac = {"train": 0.8, "val": 0.1, "test": 0.1}
    a = split_subjects(ids, frac, seed=0)
    assert a == split_subjects(list(reversed(ids)), frac, seed=0)
    assert a != split_subjects(ids, frac, seed=1)
    assert sorted(a.values()).count("train") == 16 and sorted(a.values()).count("val") == 2
    with pytest.raises(UserError, match=r"data\.split"):
        split_subjects(["a", "b"], {"train": 0.0, "val": 0.5, "test": 0.5}, seed=0)


def test_prepare_twice_is_a_noop_and_a_changed_knob_rebuilds(make_cfg) -> None:
    cfg = make_cfg(*SMALL)
    download_dataset(cfg, "acdc")
    out = prepare_dataset(cfg, "acdc")
    before = tree_state(out)
    prepare_dataset(cfg, "acdc")
    assert tree_state(out) == before
    cfg2 = make_cfg(*SMALL, "data.image_size=8")
    prepare_dataset(cfg2, "acdc")
    assert Image.open(out / manifest(out)[0]["file"]).size == (8, 8)


def test_max_subjects_limits_subjects(make_cfg) -> None:
    cfg = make_cfg(*SMALL, "data.chestxray.max_subjects=5")
    download_dataset(cfg, "chestxray")
    rows = manifest(prepare_dataset(cfg, "chestxray"))
    assert len({r["subject"] for r in rows}) == 5


# ---------------------------------------------------------------------------------- bad inputs
def _ready(make_cfg, dataset: str):
    """A downloaded raw tree and a finished prepared folder whose state must survive a bad input."""
    cfg = make_cfg(*SMALL)
    raw = download_dataset(cfg, dataset)
    out = prepare_dataset(cfg, dataset)
    (raw / ".vmddpm-download.json").write_text(
        (raw / ".vmddpm-download.json").read_text().replace('"sha256": "', '"sha256": "edited')
    )  # the raw data "changed": prepare must redo its work (and meet the bad file)
    return cfg, raw, out, tree_state(out)


def _assert_fails_naming(cfg, dataset: str, path: Path, out: Path, state: dict, *words: str) -> None:
    with pytest.raises(UserError) as e:
        prepare_dataset(cfg, dataset)
    msg = one_line(e)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    assert tree_state(out) == state  # finished outputs untouched
    assert not list(out.parent.glob(".*partial"))


def test_corrupt_jpeg(make_cfg) -> None:
    cfg, raw, out, state = _ready(make_cfg, "chestxray")
    bad = sorted(raw.rglob("*.jpeg"))[3]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])
    _assert_fails_naming(cfg, "chestxray", bad, out, state, "corrupt")


def test_corrupt_nifti(make_cfg) -> None:
    cfg, raw, out, state = _ready(make_cfg, "brats2018")
    bad = sorted(raw.rglob("*_flair.nii.gz"))[1]
    bad.write_bytes(bad.read_bytes()[:300])
    _assert_fails_naming(cfg, "brats2018", bad, out, state, "NIfTI")


def test_2d_instead_of_3d_nifti(make_cfg) -> None:
    cfg, raw, out, state = _ready(make_cfg, "acdc")
    bad = sorted(raw.rglob("*_frame01.nii.gz"))[0]
    img = nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4))
    bad.write_bytes(gzip.compress(img.to_bytes()))
    _assert_fails_naming(cfg, "acdc", bad, out, state, "2-D", "3-D")


def test_brats_subject_missing_a_modality(make_cfg) -> None:
    cfg, raw, out, state = _ready(make_cfg, "brats2018")
    gone = sorted(raw.rglob("*_t1ce.nii.gz"))[2]
    gone.unlink()
    _assert_fails_naming(cfg, "brats2018", gone, out, state, "t1ce", "missing")


def test_acdc_info_missing_es(make_cfg) -> None:
    cfg, raw, out, state = _ready(make_cfg, "acdc")
    info = sorted(raw.rglob("Info.cfg"))[1]
    info.write_text(
        "".join(line + "\n" for line in info.read_text().splitlines() if not line.startswith("ES"))
    )
    _assert_fails_naming(cfg, "acdc", info, out, state, "ES")


def test_prepare_without_download_says_what_to_run(make_cfg) -> None:
    cfg = make_cfg(*SMALL)
    with pytest.raises(UserError) as e:
        prepare_dataset(cfg, "acdc")
    assert str(cfg.raw_dir("acdc")) in one_line(e) and "vmddpm download --dataset acdc" in str(e.value)


# ------------------------------------------------------------------------ interruption and the CLI
def test_cli_download_prepare_and_kill_then_rerun_completes(make_cfg, cli, tmp_path) -> None:
    make_cfg()  # writes params.yaml into tmp_path
    sets = [a for s in (*SMALL, "data.phantoms.brats2018_subjects=12") for a in ("--set", s)]
    cli("download", "--dataset", "brats2018", *sets, cwd=tmp_path)
    # slow the run down so the kill lands mid-way (a real process, a real SIGKILL)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_PREPARE,
            str(tmp_path / "params.yaml"),
            *SMALL,
            "data.phantoms.brats2018_subjects=12",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    prepared = tmp_path / "data" / "prepared"

    def partials() -> list[Path]:  # the killed process's own temporary folder (host and pid in its name)
        return list(prepared.glob(".brats2018.partial*")) if prepared.is_dir() else []

    deadline = time.time() + 60
    while time.time() < deadline and not (partials() and len(list(partials()[0].rglob("*.png"))) >= 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    final = prepared / "brats2018"
    assert len(partials()) == 1 and not final.exists()  # interrupted: nothing looks finished

    first = cli("prepare", "--dataset", "brats2018", *sets, cwd=tmp_path)
    rows = manifest(final)
    assert rows and all((final / r["file"]).is_file() for r in rows) and not partials()
    assert json.loads((final / "prepare.json").read_text())["slices"]["train"] > 0
    assert "wrote" in first.stderr
    second = cli("prepare", "--dataset", "brats2018", *sets, cwd=tmp_path)
    assert "already prepared" in second.stderr


_SLOW_PREPARE = """
import sys, time
from vmddpm.config import load_config
from vmddpm.data import prepare
from vmddpm.stages.prepare import prepare_dataset
real = prepare.png
def slow(img):
    time.sleep(0.05)
    return real(img)
prepare.png = slow
prepare_dataset(load_config(sys.argv[1], overrides=sys.argv[2:]), "brats2018")
"""
