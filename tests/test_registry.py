"""The model registry: every preset builds, signatures, `vmddpm model summary` through the real CLI."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY
from vmddpm.errors import UserError
from vmddpm.nn.registry import build_gan, build_model, count_parameters, model_signature


def test_every_preset_of_params_yaml_builds(make_cfg) -> None:
    cfg = make_cfg(*TINY)
    for name, preset in cfg.presets.items():
        model = build_model(cfg, name)
        assert count_parameters(model) > 0, name
        if preset.family == "gan":
            z = torch.randn(2, cfg.baselines.gan.z_dim)
            assert model(z).shape == (2, 1, cfg.data.image_size, cfg.data.image_size)
        else:
            x = torch.randn(2, 1, cfg.data.image_size, cfg.data.image_size)
            with torch.no_grad():
                assert model(x, torch.randint(0, 1000, (2,))).shape == x.shape, name


def test_build_gan_returns_generator_and_discriminator(make_cfg) -> None:
    cfg = make_cfg(*TINY)
    gen, disc = build_gan(cfg, "dcgan")
    fake = gen(torch.randn(3, cfg.baselines.gan.z_dim))
    assert fake.shape == (3, 1, 16, 16)
    assert disc(fake).shape[0] == 3
    with pytest.raises(UserError, match="not a gan"):
        build_gan(cfg, "vmddpm")


def test_unknown_model_is_a_user_error_with_a_suggestion(make_cfg) -> None:
    cfg = make_cfg(*TINY)
    with pytest.raises(UserError, match="did you mean vmddpm_csm"):
        build_model(cfg, "vmddpm_cms")


def test_signature_tells_architectures_apart_but_not_runtime_choices(make_cfg) -> None:
    cfg = make_cfg(*TINY)
    sig = model_signature(cfg, "vmddpm")
    assert sig["family"] == "vmunet" and sig["sr"] == "window" and sig["base_channels"] == 8
    assert model_signature(cfg, "vmddpm_csm") != sig
    assert model_signature(make_cfg(*TINY, "model.scan_backend=ref"), "vmddpm") == sig
    assert model_signature(make_cfg(*TINY, "model.d_state=8"), "vmddpm") != sig
    assert model_signature(cfg, "wgan_gp")["gan_loss"] == "wgan_gp"
    assert model_signature(cfg, "dit")["image_size"] == 16


def _total(stdout: str) -> int:
    match = re.search(r"total parameters: ([\d,]+)", stdout)
    assert match, stdout
    return int(match.group(1).replace(",", ""))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_model_summary_cli_prints_stages_and_counts(cli, workdir: Path) -> None:
    proc = cli("model", "summary", "--model", "vmddpm", cwd=workdir)
    out = proc.stdout
    for stage in ("stem", "encoder.0", "encoder.1", "bottleneck", "decoder.1", "decoder.0", "out"):
        assert re.search(rf"^{re.escape(stage)}\s+\(1, \d+, \d+, \d+\)\s+[\d,]+$", out, re.M), (stage, out)
    assert "(1, 16, 32, 32)" in out  # demo: base 16 channels at 32x32
    demo = _total(out)
    assert demo > 0

    paper = _total(
        cli(
            "model", "summary", "--model", "vmddpm", "--scale", "paper", "--image-size", "32", cwd=workdir
        ).stdout
    )
    assert paper > demo


def test_model_summary_cli_errors_are_one_line(cli, workdir: Path) -> None:
    proc = cli("model", "summary", "--model", "vmddpm_cms", cwd=workdir, check=False)
    assert proc.returncode == 2
    assert "did you mean vmddpm_csm" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("model", "summary", "--model", "vmddpm", "--image-size", "31", cwd=workdir, check=False)
    assert proc.returncode == 2
    assert "divisible by 2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
