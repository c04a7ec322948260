"""A training job killed under an orchestrator resumes on the rerun, bit-identically (issue 16, 1).

Both tools delete a train job's declared output around a failure or a rerun (Snakemake: `cleanup()` of
a failed job and `remove_existing_output()` before a job; `dvc repro`: a stage's outs before its
command, unless `persist`), so the step checkpoints live beside it, in `runs/<ds>/<m>/checkpoints/`
(vmddpm.trainkit). Here the real tools run the acdc x vmddpm pair of a fresh copy of the repository
and are killed the two ways a run ends unasked: Ctrl-C (SIGINT to the whole foreground process group,
as a terminal sends it: vmddpm checkpoints the step it finished) and a crash (SIGKILL to the group:
only the periodic checkpoints exist). The rerun resumes from the newest checkpoint and ends with
weights bit-identical to an uninterrupted run (CPU, one thread). The SLURM time limit is
tests/test_slurm.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests import test_workflow as wf
from tests.conftest import ONE_THREAD_ENV, signalable

pytestmark = pytest.mark.slow

DS, M = "acdc", "vmddpm"
STEPS, EVERY = 30, 5
TARGET = {"snakemake": f"runs/{DS}/{M}/train", "dvc": f"train-{M}@{DS}"}


def make_repo(dest: Path) -> Path:
    """A fresh copy (the .test sizes) reduced to acdc x vmddpm, trained for STEPS steps."""
    repo = wf.make_fresh_repo(dest)
    wf.narrow(repo, [DS], [M])
    for key, value in (("steps", STEPS), ("checkpoint_every", EVERY), ("log_every", EVERY)):
        wf.set_param(repo, f"scales.demo.train.{key}", value)
    wf.run("git", "commit", "-qam", "acdc x vmddpm", cwd=repo)
    return repo


def env() -> dict[str, str]:
    return {**wf.tool_env(), **ONE_THREAD_ENV}


def command(tool: str, rerun: bool = False) -> list[str]:
    """The run, and the rerun: Snakemake's names the killed job's output incomplete and asks for
    `--rerun-incomplete` (what both profiles set)."""
    if tool == "snakemake":
        return [
            str(wf.BIN / "snakemake"),
            "--cores",
            "1",
            *(["--rerun-incomplete"] if rerun else []),
            TARGET[tool],
        ]
    return [str(wf.BIN / "dvc"), "repro", TARGET[tool]]


def steps(repo: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in repo.glob(f"runs/{DS}/{M}/checkpoints/*/step_*.pt"))


def data_hashes(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for top in ("data/raw", "data/prepared")
        for p in sorted((repo / top).rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def train_runs(repo: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vmddpm")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return sorted((r for r in runs if r.data.tags.get("stage") == "train"), key=lambda r: r.info.start_time)


def weights(repo: Path) -> dict[str, torch.Tensor]:
    state = torch.load(repo / "runs" / DS / M / "train" / "model.pt", weights_only=True)
    return {f"{part}.{k}": v for part in ("model", "ema") for k, v in state[part].items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted run (the CLI, one thread)."""
    repo = make_repo(tmp_path_factory.mktemp("straight") / "repo")
    for args in (("download", "--dataset", DS), ("prepare", "--dataset", DS)):
        wf.run(str(wf.BIN / "vmddpm"), *args, cwd=repo)
    subprocess.run(
        [str(wf.BIN / "vmddpm"), "train", "--dataset", DS, "--model", M], cwd=repo, env=env(), check=True
    )
    return weights(repo)


@pytest.mark.parametrize("tool", ["snakemake", "dvc"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_killed_train_job_resumes_bit_identically(tool: str, sig: int, straight, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    proc = subprocess.Popen(
        signalable(command(tool)),  # SIGINT reaches it even when pytest was started ignoring it
        cwd=repo,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 600
    while not steps(repo) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert steps(repo), f"no checkpoint before the kill:\n{out[-3000:]}"
    killed_at = steps(repo)[-1]
    assert 0 < killed_at < STEPS, f"{tool} finished before the kill ({killed_at})"
    assert not (repo / "runs" / DS / M / "train" / "model.pt").exists()
    data = data_hashes(repo)
    (run,) = train_runs(repo)
    assert run.info.status == ("KILLED" if sig == signal.SIGINT else "RUNNING")
    if (
        sig == signal.SIGINT
    ):  # vmddpm checkpointed the step it finished (its log: Snakemake's, or dvc's output)
        log = (repo / "logs" / "train" / DS / f"{M}.log").read_text() if tool == "snakemake" else out
        assert f"stopped by SIGINT at step {killed_at}; checkpoint written" in log, log[-3000:]

    if tool == "snakemake" and sig == signal.SIGKILL:
        wf.run(str(wf.BIN / "snakemake"), "--unlock", cwd=repo)  # its lock outlives a killed run
    rerun = subprocess.run(
        command(tool, rerun=True), cwd=repo, env=env(), capture_output=True, text=True, timeout=900
    )
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-4000:]
    log = (repo / "logs" / "train" / DS / f"{M}.log").read_text() if tool == "snakemake" else text
    resumed = re.search(r"resuming from \S+step_(\d+)\.pt \(step (\d+)\)", log)
    assert resumed and int(resumed.group(2)) == killed_at, log[-3000:]
    got = weights(repo)
    assert got.keys() == straight.keys()
    assert all(torch.equal(got[k], straight[k]) for k in straight), "resumed weights differ"
    assert data_hashes(repo) == data  # the finished upstream outputs were not touched
    old, new = train_runs(repo)
    assert old.info.status == ("KILLED" if sig == signal.SIGINT else "FAILED")
    assert new.info.status == "FINISHED" and new.data.params["resumed_from_step"] == str(killed_at)
