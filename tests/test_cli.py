"""The `vmddpm` CLI as a user meets it: help, config show, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import ROOT

SUBCOMMANDS = (
    "download",
    "prepare",
    "phantoms",
    "train",
    "sample",
    "evaluate",
    "sweep",
    "report",
    "reader-study",
)


def test_help_lists_every_subcommand(cli, tmp_path: Path) -> None:
    out = cli("--help", cwd=tmp_path).stdout
    for name in (*SUBCOMMANDS, "config", "model"):
        assert name in out


def test_console_script_is_installed(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "vmddpm"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("vmddpm ")


def test_import_is_light() -> None:
    """`import vmddpm` and the CLI module must not drag in torch or any pipeline tool."""
    code = (
        "import sys, vmddpm, vmddpm.cli, vmddpm.config, vmddpm.contracts; "
        "print(sorted(m for m in ('torch', 'mlflow', 'snakemake', 'dvc') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_config_show_scales_differ(cli) -> None:
    demo = yaml.safe_load(cli("config", "show", cwd=ROOT).stdout)
    paper = yaml.safe_load(cli("config", "show", "--scale", "paper", cwd=ROOT).stdout)
    overlay = yaml.safe_load((ROOT / "params.yaml").read_text())["scales"]["demo"]
    assert demo["scale"] == "demo" and paper["scale"] == "paper"
    for group, knobs in overlay.items():
        for key, value in knobs.items():
            if not isinstance(value, dict):
                assert demo[group][key] == value
    assert demo["train"]["steps"] != paper["train"]["steps"]
    assert demo["data"]["image_size"] != paper["data"]["image_size"]
    assert demo["diffusion"] == paper["diffusion"]


def test_config_show_json_and_get(cli) -> None:
    doc = json.loads(cli("config", "show", "--format", "json", cwd=ROOT).stdout)
    assert cli("config", "get", "train.steps", cwd=ROOT).stdout.strip() == str(doc["train"]["steps"])
    got = cli("config", "get", "train.steps", "--set", "train.steps=3", cwd=ROOT).stdout.strip()
    assert got == "3"


def _bad(cli, tmp_path: Path, *args: str) -> str:
    proc = cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return lines[0]


def _params(tmp_path: Path, edit=None) -> Path:
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    if edit:
        doc = yaml.safe_load(p.read_text())
        edit(doc)
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_unknown_key_exit_2(cli, tmp_path: Path) -> None:
    _params(tmp_path, lambda d: d["train"].update(lr_rate=1))
    line = _bad(cli, tmp_path, "config", "show")
    assert line.endswith("params.yaml: train.lr_rate is not a known key; did you mean train.lr?")


def test_wrong_type_exit_2(cli, tmp_path: Path) -> None:
    _params(tmp_path, lambda d: d["sample"].update(steps="many"))
    assert "params.yaml: sample.steps must be int" in _bad(cli, tmp_path, "config", "validate")


def test_negative_steps_exit_2(cli, tmp_path: Path) -> None:
    _params(tmp_path)
    assert "train.steps must be >= 1, got -1" in _bad(
        cli, tmp_path, "config", "show", "--set", "train.steps=-1"
    )


def test_missing_params_exit_2(cli, tmp_path: Path) -> None:
    line = _bad(cli, tmp_path, "config", "show")
    assert "params.yaml: no such file" in line


def test_malformed_yaml_exit_2(cli, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("train: {steps: 3\n")
    assert "params.yaml: malformed YAML at line" in _bad(cli, tmp_path, "config", "show")


def test_debug_shows_traceback(cli, tmp_path: Path) -> None:
    proc = cli("config", "show", "--debug", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_params_flag_and_env_independent_of_cwd(cli, tmp_path: Path) -> None:
    p = _params(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    out = cli("config", "get", "paths.data", "--params", str(p), cwd=other, env={"PWD": os.fspath(other)})
    assert out.stdout.strip() == "data"


def test_make_install_is_up_to_date() -> None:
    """Acceptance: a second `make test` reuses the install (the stamp is keyed on constraints.txt)."""
    if not shutil.which("make"):
        raise AssertionError("make is required")
    proc = subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "the install stamp is stale: `make test` would reinstall"
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "pip install" not in dry


def test_options_before_and_after_subcommand_combine(cli) -> None:
    """`vmddpm --scale paper config get ...` == `vmddpm config get ... --scale paper`; --set adds up."""
    before = cli("--scale", "paper", "config", "get", "train.steps", cwd=ROOT).stdout
    after = cli("config", "get", "train.steps", "--scale", "paper", cwd=ROOT).stdout
    assert before == after
    both = cli(
        "--set", "train.steps=4", "config", "show", "--format", "json", "--set", "train.lr=1", cwd=ROOT
    )
    doc = json.loads(both.stdout)
    assert doc["train"]["steps"] == 4 and doc["train"]["lr"] == 1.0


def test_mistyped_subcommand_gets_did_you_mean(cli, tmp_path: Path) -> None:
    proc = cli("trian", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("invalid choice: 'trian'; did you mean train?")
    proc = cli("config", "shwo", cwd=tmp_path, check=False)
    assert "did you mean show?" in proc.stderr
    proc = cli("reader-study", "mkae", cwd=tmp_path, check=False)
    assert "did you mean make?" in proc.stderr


def test_suggested_command_keeps_the_users_flags(cli, tmp_path: Path) -> None:
    """An error that suggests a next command repeats --params/--scale/--set, so it runs against the same
    configuration (here: sampling before preparing, at paper scale)."""
    p = _params(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    proc = cli(
        "--scale", "paper", "sample", "--dataset", "acdc", "--model", "vmddpm",
        "--params", str(p), "--set", "sample.steps=50", cwd=other, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert f"`vmddpm --params {p} --scale paper --set sample.steps=50 prepare --dataset acdc`" in line, line


def test_config_dvc_writes_and_checks_dvc_yaml(cli, tmp_path: Path) -> None:
    """dvc.yaml is generated from params.yaml: --check passes on the repository, fails (exit 2, one line
    naming the fix) once the matrix changes, and --write repairs it."""
    assert cli("config", "dvc", "--check", cwd=ROOT).returncode == 0
    p = _params(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert cli("config", "dvc", "--check", "--params", str(p), cwd=tmp_path).returncode == 0
    doc = yaml.safe_load(p.read_text())
    doc["models"] = ["vmddpm", "dcgan"]
    p.write_text(yaml.safe_dump(doc))
    proc = cli("config", "dvc", "--check", "--params", str(p), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "config dvc --write`" in proc.stderr
    # a stage run by DVC (DVC sets DVC_STAGE) stops on the stale file before doing anything
    proc = cli(
        "download", "--dataset", "acdc", "--params", str(p), cwd=tmp_path, check=False,
        env={"DVC_STAGE": "download@acdc"},
    )  # fmt: skip
    assert proc.returncode == 2 and "dvc.yaml: out of date" in proc.stderr
    cli("config", "dvc", "--write", "--params", str(p), cwd=tmp_path)
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "train-dcgan" in stages and "train-vmddpm" in stages and "train-unet_attn" not in stages
    assert stages["sample-gan"]["matrix"]["model"] == ["dcgan"]
