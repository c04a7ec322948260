"""Shared fixtures: a private copy of params.yaml per test, and the real CLI as a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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


# A shell starts a background job of a script (`make test &`, `nohup make test &`, a CI step's `cmd &`)
# with SIGINT ignored, and an ignored signal stays ignored across fork and exec: pytest, and every
# process it starts, inherit it. `vmddpm` keeps an inherited SIG_IGN (as Python does; vmddpm.signals),
# so a test's SIGINT would be lost and the training would run to its end. Every command a test signals
# therefore starts through this launcher, which puts SIGINT and SIGTERM back to their defaults and
# execs the command (same pid, so `send_signal` and `killpg` reach it).
_DEFAULT_SIGNALS = (
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGTERM):\n"
    "    signal.signal(s, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def signalable(cmd: Sequence[str]) -> list[str]:
    """`cmd` started with SIGINT and SIGTERM at their defaults, whatever the test process inherited."""
    return [sys.executable, "-c", _DEFAULT_SIGNALS, *map(str, cmd)]


# One CPU thread: fast on a shared machine, and the same float reduction order in every process.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_thread(monkeypatch):
    """Run the test (and the processes it starts) on one thread; restore torch's settings after.
    Modules that train use it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    for k, v in ONE_THREAD_ENV.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def step_files(train_dir: Path) -> list[Path]:
    """The step checkpoints of a train folder (every run key), oldest first by name."""
    return sorted(Path(train_dir).parent.glob("checkpoints/*/step_*.pt"), key=lambda p: p.name)


def kill_and_resume(
    tmp_path: Path,
    args: Sequence[str],
    prepare: Callable[[Path], object],
    train_dir: str,
    max_step: int,
    remove_output: bool = False,
) -> tuple[Path, Path]:
    """Train `vmddpm ARGS` twice in two fresh project folders (a copy of params.yaml, `prepare(root)`
    writes the data): once straight through, once SIGKILLed as soon as its first step checkpoint exists
    (`checkpoints/<run key>/` beside the train folder) and then rerun to resume. Returns the two train
    folders (straight, resumed) for the caller to compare. `remove_output`: delete the killed run's train
    folder before the rerun, as Snakemake does to a failed job's output."""
    from vmddpm.trainkit import load_checkpoint

    roots = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        root.mkdir()
        shutil.copy(ROOT / "params.yaml", root / "params.yaml")
        prepare(root)
        roots[name] = root
    run_cli(*args, cwd=roots["straight"], env=ONE_THREAD_ENV)

    killed = roots["killed"] / train_dir
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmddpm", *args],
        cwd=roots["killed"],
        env={**os.environ, **ONE_THREAD_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not step_files(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.pt").exists()
    assert 0 < load_checkpoint(step_files(killed)[-1])["step"] < max_step
    if remove_output:
        shutil.rmtree(killed)
    run_cli(*args, cwd=roots["killed"], env=ONE_THREAD_ENV)
    return roots["straight"] / train_dir, killed
