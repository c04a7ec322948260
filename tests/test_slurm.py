"""The cluster path, for real: the demo pipeline restricted to acdc x vmddpm through the slurm profile
(`snakemake --profile workflow/profiles/slurm`, executor `slurm`) on a single-node SLURM cluster the
test starts (tests/slurm_cluster.py), with a train job ended by its SLURM time limit and resumed by the
rerun (issue 16, acceptance 1).

What the command line adds to the profile, and why: `--config scale=demo` (the profile is for paper
scale, where each rule's `gpu` resource asks for a GPU; at demo scale it is 0); resources that fit this
machine (`--default-resources`, `--set-resources`: the node has the machine's cores and memory, not the
profile's 4-8 CPUs and 8-32 GB per task); `--slurm-status-command squeue` (no accounting database, so
no sacct) and a 1 s first status check; `--slurm-no-account`. The first run gives train 1 minute for
100,000 steps: SLURM ends it (TIMEOUT, SIGTERM: vmddpm checkpoints the step it finished) and
Snakemake removes the train folder of the failed job. The rerun asks for 10 steps more than that
checkpoint holds (`train.steps` is not part of the run key: a longer run extends a shorter one, so the
test need not wait out the long run), resumes from it and runs the pipeline to the end. Marked slow:
about five minutes, most of it SLURM's time limit and the plugin's status polling.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests import test_workflow as wf
from tests.conftest import ONE_THREAD_ENV
from tests.slurm_cluster import missing_tools, slurm_cluster

pytestmark = pytest.mark.slow

DS, M = "acdc", "vmddpm"
STEPS = 100_000  # far more than a 1-minute limit allows


def snakemake(repo: Path, env: dict[str, str], train_minutes: int) -> subprocess.CompletedProcess:
    args = [
        str(wf.BIN / "snakemake"),
        "--profile",
        "workflow/profiles/slurm",
        "--config",
        "scale=demo",
        "--default-resources",
        "slurm_partition=gpu",
        "mem_mb=1000",
        "runtime=10",
        "cpus_per_task=1",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-no-account",
        "--set-resources",
        f"train:runtime={train_minutes}",
        "--jobs",
        "2",
    ]
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=1500)


def test_slurm_profile_resumes_a_train_job_ended_by_its_time_limit(tmp_path: Path) -> None:
    if missing_tools():
        pytest.skip(f"{', '.join(missing_tools())} missing: `make slurm` installs slurm-wlm + munge")
    repo = wf.make_fresh_repo(tmp_path / "repo")
    wf.narrow(repo, [DS], [M])
    for key, value in (("steps", STEPS), ("checkpoint_every", 200), ("log_every", 200)):
        wf.set_param(repo, f"scales.demo.train.{key}", value)
    wf.run("git", "commit", "-qam", f"acdc x vmddpm, {STEPS} steps", cwd=repo)
    train_log = repo / "logs" / "train" / DS / f"{M}.log"

    with slurm_cluster(tmp_path / "slurm", partition="gpu") as cluster:
        env = {**wf.tool_env(), **cluster.env, **ONE_THREAD_ENV}
        first = snakemake(repo, env, train_minutes=1)
        text = first.stdout + first.stderr
        assert first.returncode != 0, f"the train job was not ended by its time limit:\n{text[-3000:]}"
        assert re.search(
            r"Error in rule train:\s+message: SLURM-job '\d+' failed, SLURM status is: 'TIMEOUT'", text
        ), text[-4000:]
        stopped = re.search(r"stopped by SIGTERM at step (\d+); checkpoint written", train_log.read_text())
        assert stopped, train_log.read_text()[-3000:]
        at = int(stopped.group(1))
        assert 0 < at < STEPS
        assert not (repo / "runs" / DS / M / "train").exists()  # Snakemake removed the failed job's output
        assert list((repo / "runs" / DS / M / "checkpoints").glob(f"*/step_{at:08d}.pt"))

        wf.set_param(repo, "scales.demo.train.steps", at + 10)
        second = snakemake(repo, env, train_minutes=10)
        text = second.stdout + second.stderr
        assert second.returncode == 0, text[-5000:]
        resumed = re.search(r"resuming from \S+ \(step (\d+)\)", train_log.read_text())
        assert resumed and int(resumed.group(1)) == at, train_log.read_text()[-3000:]
        assert f"trained to step {at + 10}" in train_log.read_text()
        for out in ("results/tables/main.md", f"runs/{DS}/{M}/metrics.json", "logs/dvc_commit.done"):
            assert (repo / out).is_file(), out
        assert "TIMEOUT" not in text
