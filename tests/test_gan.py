"""vmddpm.stages.gan: dcgan/wgan_gp train with finite losses and a changing generator, finished runs are
no-ops, samples depend only on their seed, and a SIGKILLed `vmddpm train` resumes bit-identically."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import ONE_THREAD_ENV, TINY, kill_and_resume, run_cli
from tests.test_baselines import TINY_BASELINES
from tests.test_train import write_prepared
from vmddpm.generation import generator
from vmddpm.nn.registry import build_gan
from vmddpm.runtime import state_hash
from vmddpm.stages.gan import train_gan
from vmddpm.stages.sample import sample
from vmddpm.trainkit import load_checkpoint

DATASET = "acdc"
pytestmark = pytest.mark.usefixtures("one_thread")


def gan_cfg(make_cfg, *extra: str):
    cfg = make_cfg(*TINY, *TINY_BASELINES, *extra)
    if not (cfg.prepared_dir(DATASET) / "manifest.csv").exists():
        write_prepared(cfg.prepared_dir(DATASET), size=cfg.data.image_size)
    return cfg


@pytest.mark.parametrize("model", ["dcgan", "wgan_gp"])
def test_gan_trains_20_steps(make_cfg, tmp_path: Path, model: str) -> None:
    steps = ("train.steps=20", "train.log_every=1", "train.checkpoint_every=10")
    cfg = gan_cfg(make_cfg, *steps)
    torch.manual_seed(cfg.seed)
    g0, _ = build_gan(cfg, model)
    args = ["train", "--dataset", DATASET, "--model", model, "--set", "tracking.enabled=false"]
    for item in (*TINY, *TINY_BASELINES, *steps):
        args += ["--set", item]
    run_cli(*args, cwd=tmp_path, env=ONE_THREAD_ENV)  # through the same entry point as every model
    out = cfg.train_dir(DATASET, model)
    with (out / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert all(math.isfinite(float(r["loss_g"])) and math.isfinite(float(r["loss_d"])) for r in rows)
    final = load_checkpoint(out / "model.pt")
    assert final["step"] == 20 and final["signature"]["gan_loss"] == cfg.preset(model).gan_loss
    g1, _ = build_gan(cfg, model)
    g1.load_state_dict(final["model"])
    z = torch.randn(4, cfg.baselines.gan.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before, after = g0.eval()(z), g1.eval()(z)
    assert (before - after).abs().max() > 1e-3
    full = load_checkpoint(out / "last.pt")
    for key in ("model", "discriminator", "ema", "optimizer", "optimizer_d", "rng", "noise_rng", "sampler"):
        assert key in full


def test_finished_run_is_noop_and_samples_depend_on_own_seed(make_cfg) -> None:
    cfg = gan_cfg(make_cfg, "train.steps=4", "train.checkpoint_every=2")
    out = train_gan(cfg, DATASET, "dcgan")
    stamp = (out / "model.pt").stat().st_mtime_ns, (out / "last.pt").stat().st_mtime_ns
    train_gan(cfg, DATASET, "dcgan")
    assert ((out / "model.pt").stat().st_mtime_ns, (out / "last.pt").stat().st_mtime_ns) == stamp
    gen = generator(cfg, DATASET, "dcgan")
    batch = gen.fn([10, 11, 12])
    alone = gen.fn([11])
    assert batch.shape == (3, 1, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[2])
    # the sample stage treats the GAN as any other model: PNGs + meta naming the checkpoint step
    cfg4 = gan_cfg(make_cfg, "train.steps=4", "sample.n_images=4")
    folder = sample(cfg4, DATASET, "dcgan")
    assert len(list(folder.glob("*.png"))) == 4
    meta = json.loads((folder.parent / f"{folder.name}_meta.json").read_text())
    assert meta["family"] == "gan" and meta["checkpoint_step"] == 4


def _cli_args(*extra: str) -> list[str]:
    out = ["train", "--dataset", DATASET, "--model", "wgan_gp"]
    for item in (*TINY, *TINY_BASELINES, *extra):
        out += ["--set", item]
    return out


def test_gan_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    steps = ("train.steps=300", "train.checkpoint_every=10", "train.deterministic=true", "train.log_every=10")
    straight, train_dir = kill_and_resume(
        tmp_path,
        _cli_args(*steps),
        lambda root: write_prepared(root / "data" / "prepared" / DATASET),
        f"runs/{DATASET}/wgan_gp/train",
        max_step=300,
    )
    a, b = load_checkpoint(train_dir / "model.pt"), load_checkpoint(straight / "model.pt")
    for key in ("model", "ema", "discriminator"):
        assert state_hash(a[key]) == state_hash(b[key]), key
    la, lb = load_checkpoint(train_dir / "last.pt"), load_checkpoint(straight / "last.pt")
    assert [r["loss_d"] for r in la["history"]] == [r["loss_d"] for r in lb["history"]]
