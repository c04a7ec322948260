"""Shared fixtures: a private copy of params.yaml per test, and the real CLI as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vmddpm.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# Overrides that make every network tiny: for unit tests that train or sample on CPU in seconds.
TINY = (
    "data.image_size=16",
    "model.base_channels=8",
    "model.channel_mult=[1, 2]",
    "model.time_embed_dim=32",
    "model.d_state=4",
    "model.sr_window=2",
    "train.batch_size=4",
    "train.log_every=5",
    "sample.batch_size=8",
    "tracking.enabled=false",
)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config from a copy of the repo's params.yaml in `tmp_path` (so every output path,
    data/, runs/, results/, mlflow.db, lands in the test's own folder)."""

    def make(*overrides: str, scale: str = "demo") -> Config:
        params = tmp_path / "params.yaml"
        if not params.exists():
            shutil.copy(ROOT / "params.yaml", params)
        return load_config(params, scale=scale, overrides=overrides)

    return make


def run_cli(*args: str, cwd: Path, check: bool = True, timeout: float = 600, env: dict | None = None):
    """Run `python -m vmddpm ARGS` in `cwd` (a real process; stdout/stderr captured as text)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "vmddpm", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vmddpm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli
