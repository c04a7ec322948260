"""vmddpm.stages.sample: per-image seeds, uint8 PNGs + grid, resumable, EMA by default, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ONE_THREAD_ENV
from tests.test_train import DATASET, MODEL, tiny_cfg
from vmddpm.errors import UserError
from vmddpm.stages.sample import sample
from vmddpm.stages.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = ("sample.n_images=10", "sample.batch_size=8", "sample.sampler=ddim", "sample.steps=8")


@pytest.fixture
def trained(make_cfg):
    """A tiny model trained for a few steps (enough for EMA and raw weights to differ)."""
    cfg = tiny_cfg(make_cfg, "train.steps=6", "train.checkpoint_every=6", "train.lr=0.01", *SAMPLE)
    train(cfg, DATASET, MODEL)
    return cfg


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_pngs_grid_and_determinism(trained, tmp_path: Path) -> None:
    out = sample(trained, DATASET, MODEL)
    assert out == trained.samples_dir(DATASET, MODEL)
    files = pngs(out)
    assert list(files) == [f"{i:06d}.png" for i in range(10)]  # nothing else in the samples folder
    img = Image.open(out / "000007.png")
    assert img.mode == "L" and img.size == (16, 16)
    arr = np.array(img)
    assert arr.dtype == np.uint8 and arr.std() > 0
    grid = out.parent / "samples_grid.png"
    assert grid.is_file() and Image.open(grid).mode == "L" and Image.open(grid).size[0] > 16
    assert (out.parent / "samples_meta.json").is_file()

    again = sample(trained, DATASET, MODEL, out=tmp_path / "again")
    assert pngs(again) == files  # same seed -> identical PNGs
    assert len(set(files.values())) == 10  # different seeds -> different images


def test_resume_keeps_images_and_image_7_alone_equals_batch(trained) -> None:
    out = sample(trained, DATASET, MODEL)
    before = pngs(out)
    kept = (out / "000003.png").stat().st_mtime_ns
    (out / "000007.png").unlink()  # a killed run: image 7 missing
    sample(trained, DATASET, MODEL)  # regenerates image 7 alone
    assert (out / "000003.png").stat().st_mtime_ns == kept  # existing images are kept
    assert pngs(out) == before  # image 7 drawn alone == image 7 drawn in a batch of 8


def test_ema_is_the_default(trained, make_cfg, tmp_path: Path) -> None:
    ema = pngs(sample(trained, DATASET, MODEL, out=tmp_path / "ema"))
    raw_cfg = make_cfg(*trained_overrides(), "sample.use_ema=false")
    raw = pngs(sample(raw_cfg, DATASET, MODEL, out=tmp_path / "raw"))
    assert ema != raw


def trained_overrides() -> tuple[str, ...]:
    from tests.conftest import TINY

    return (*TINY, "train.steps=6", "train.checkpoint_every=6", "train.lr=0.01", *SAMPLE)


def test_n_images_zero_means_reference_set(trained, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*trained_overrides(), "sample.n_images=0", "eval.reference_split=test")
    out = sample(cfg, DATASET, MODEL, out=tmp_path / "ref")
    assert len(pngs(out)) == 3  # write_prepared puts 3 slices in the test split


def test_changed_settings_refuse_to_mix(trained, make_cfg) -> None:
    sample(trained, DATASET, MODEL)
    other = make_cfg(*trained_overrides(), "sample.steps=4")
    with pytest.raises(UserError, match=r"steps.*delete"):
        sample(other, DATASET, MODEL)


def test_no_trained_model_is_a_user_error(make_cfg, cli, tmp_path: Path) -> None:
    cfg = tiny_cfg(make_cfg, *SAMPLE)
    with pytest.raises(UserError, match=r"model\.pt.*vmddpm train"):
        sample(cfg, DATASET, MODEL)
    proc = cli(
        "sample", "--dataset", DATASET, "--model", MODEL, cwd=tmp_path, check=False, env=ONE_THREAD_ENV
    )
    assert proc.returncode == 2 and "vmddpm train" in proc.stderr


def test_sample_cli(trained, cli, tmp_path: Path) -> None:
    args = ["sample", "--dataset", DATASET, "--model", MODEL, "--out", str(tmp_path / "cli")]
    for item in trained_overrides():
        args += ["--set", item]
    cli(*args, cwd=tmp_path, env=ONE_THREAD_ENV)
    assert pngs(tmp_path / "cli") == pngs(sample(trained, DATASET, MODEL))
