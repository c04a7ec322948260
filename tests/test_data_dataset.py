"""Phantom raw layouts and file formats, their determinism, and the SliceDataset over prepared slices."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from vmddpm.contracts import read_manifest, split_files
from vmddpm.data.dataset import SliceDataset
from vmddpm.data.phantoms import write_phantoms
from vmddpm.errors import UserError
from vmddpm.io import sha256_file
from vmddpm.stages.download import download_dataset
from vmddpm.stages.prepare import prepare_dataset

SMALL = (
    "data.image_size=16",
    "data.phantoms.size=32",
    "data.phantoms.depth=8",
    "data.phantoms.acdc_slices=3",
    "data.phantoms.acdc_frames=5",
    "data.phantoms.chestxray_subjects=6",
    "data.phantoms.brats2018_subjects=4",
    "data.phantoms.acdc_subjects=4",
)


def test_phantom_archives_are_deterministic_and_in_the_official_layout(make_cfg, tmp_path) -> None:
    cfg = make_cfg(*SMALL)
    names = {}
    for ds in ("chestxray", "brats2018", "acdc"):
        a = write_phantoms(cfg, ds, tmp_path / "a" / ds)
        b = write_phantoms(cfg, ds, tmp_path / "b" / ds)
        assert sha256_file(a) == sha256_file(b)  # byte-identical: the download step can pin it
        names[ds] = zipfile.ZipFile(a).namelist()
    assert Path(names["chestxray"][0]).parts[0] == "chest_xray"
    assert {Path(n).parts[1] for n in names["chestxray"]} <= {"train", "test"}
    assert {Path(n).parts[2] for n in names["chestxray"]} == {"NORMAL", "PNEUMONIA"}
    jpeg = tmp_path / "a" / "chestxray" / names["chestxray"][0]
    assert Image.open(jpeg).format == "JPEG"

    grades = {Path(n).parts[1] for n in names["brats2018"]}
    assert grades == {"HGG", "LGG"}
    sid = Path(names["brats2018"][0]).parts[2]
    suffixes = sorted(n.split(f"{sid}_")[1] for n in names["brats2018"] if f"/{sid}/" in n)
    assert suffixes == sorted(f"{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
    vol = nib.load(
        tmp_path / "a" / "brats2018" / "MICCAI_BraTS_2018_Data_Training" / "HGG" / sid / f"{sid}_flair.nii.gz"
    )
    assert vol.shape == (32, 32, 8) and np.allclose(np.abs(np.diag(vol.affine))[:3], 1.0)
    assert vol.affine[0, 0] < 0  # BraTS volumes are stored x-flipped (LPS-like), as the official ones

    patient = tmp_path / "a" / "acdc" / "database" / "training" / "patient001"
    info = dict(line.split(": ") for line in (patient / "Info.cfg").read_text().splitlines())
    assert sorted(info) == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
    cine = nib.load(patient / "patient001_4d.nii.gz")
    assert cine.ndim == 4 and cine.shape[2:] == (3, 5) and cine.header.get_zooms()[2] == 10.0
    for key in ("ED", "ES"):
        frame = patient / f"patient001_frame{int(info[key]):02d}.nii.gz"
        gt = nib.load(frame.with_name(frame.name.replace(".nii.gz", "_gt.nii.gz")))
        assert nib.load(frame).shape == cine.shape[:3] and set(np.unique(gt.dataobj)) <= {0, 1, 2, 3}
    assert (tmp_path / "a" / "acdc" / "database" / "testing").is_dir()


def test_cli_phantoms_tree_only(make_cfg, cli, tmp_path) -> None:
    make_cfg()
    sets = [a for s in SMALL for a in ("--set", s)]
    cli("phantoms", "--dataset", "acdc", "--out", "ph", "--no-archive", *sets, cwd=tmp_path)
    assert (tmp_path / "ph" / "database" / "training").is_dir()
    assert not (tmp_path / "ph" / "ACDC.zip").exists()


@pytest.fixture
def prepared(make_cfg) -> Path:
    cfg = make_cfg(*SMALL)
    download_dataset(cfg, "acdc")
    return prepare_dataset(cfg, "acdc")


def test_slice_dataset_values_and_flips(prepared) -> None:
    ds = SliceDataset(prepared, split="train", hflip=False, image_size=16)
    rows = read_manifest(prepared)
    assert len(ds) == sum(r["split"] == "train" for r in rows)
    x = ds[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    png = np.asarray(Image.open(ds.files[0]), dtype=np.float32)
    assert torch.allclose(x[0], torch.from_numpy(png / 127.5 - 1))
    flips = SliceDataset(prepared, split="train", hflip=True)
    torch.manual_seed(0)
    seen = {bool(torch.equal(flips[0], x)) for _ in range(20)}
    assert seen == {True, False}  # sometimes flipped, sometimes not
    for y in (flips[0] for _ in range(5)):
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
    assert split_files(prepared, "test") and all(p.is_file() for p in split_files(prepared, "test"))


def test_slice_dataset_errors_name_the_folder_and_say_prepare(prepared, tmp_path) -> None:
    with pytest.raises(UserError) as e:
        SliceDataset(tmp_path / "nowhere" / "acdc")
    assert str(tmp_path / "nowhere" / "acdc") in str(e.value) and "vmddpm prepare --dataset acdc" in str(
        e.value
    )
    with pytest.raises(UserError, match=r"manifest\.csv.*split == nope.*vmddpm prepare"):
        SliceDataset(prepared, split="nope")
    with pytest.raises(UserError, match=r"16x16.*data\.image_size is 32"):
        SliceDataset(prepared, image_size=32)
    bad = tmp_path / "badcols"
    bad.mkdir()
    (bad / "manifest.csv").write_text("path,split\nx.png,train\n")
    with pytest.raises(UserError, match="columns"):
        read_manifest(bad)
