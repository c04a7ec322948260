"""A real single-node SLURM cluster for the tests, started and stopped by them.

Debian's `slurm-wlm` and `munge` (`make slurm` installs them): `munged` with a generated key on a
private socket, `slurmctld` and `slurmd` with a minimal `slurm.conf` in a temporary folder (one node with
the machine's cores, one partition named like the profile's, `select/cons_tres`, `proctrack/linuxproc`,
`task/none`, no accounting, private ports). Clients find it through `SLURM_CONF`, which the cluster's
`env` holds. The daemons run as the current user (root in CI, where they were tried), so jobs run as
the user who submits them.

One shim: inside a job, snakemake's slurm-jobstep plugin drops every `SLURM_*` variable but the job's
identity before it calls `srun` for the rule, `SLURM_CONF` included; a real cluster keeps slurm.conf at
the compiled-in path, which this one (in a temporary folder) cannot. So `env`'s PATH starts with a folder
whose `srun` sets `SLURM_CONF` and runs the real one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")


def missing_tools() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None]


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    partition: str

    def squeue(self) -> str:
        return subprocess.run(
            ["squeue", "-h", "-o", "%i %j %T %r"], env=self.env, capture_output=True, text=True, check=False
        ).stdout

    def job_state(self, job_id: str) -> str:
        out = subprocess.run(
            ["scontrol", "show", "job", job_id], env=self.env, capture_output=True, text=True, check=False
        ).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise RuntimeError(f"local SLURM cluster: {what} did not happen within {timeout:.0f}s")


@contextlib.contextmanager
def slurm_cluster(root: Path, partition: str = "gpu", kill_wait: int = 10) -> Iterator[Cluster]:
    """Start munged + slurmctld + slurmd under `root`; stop them (and their jobs) on exit."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("etc", "state", "spool", "log", "run"):
        (root / d).mkdir(exist_ok=True)
    key = root / "etc" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "run" / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = root / "etc" / "slurm.conf"
    user = pwd.getpwuid(os.getuid()).pw_name
    conf.write_text(
        "\n".join(
            [
                "ClusterName=vmddpmtest",
                f"SlurmctldHost={host}",
                f"SlurmUser={user}",
                f"SlurmdUser={user}",
                "AuthType=auth/munge",
                f"AuthInfo=socket={sock}",
                "CredType=cred/munge",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SchedulerType=sched/builtin",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "ReturnToService=2",
                f"KillWait={kill_wait}",
                "MinJobAge=600",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                f"NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
                f"PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    shim = root / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "srun").write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun")} "$@"\n')
    (shim / "srun").chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = root / "log"
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> None:
        out = open(logs / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )

    try:
        start(
            [
                "munged",
                "-F",
                "-f",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={logs / 'munged.log'}",
                f"--pid-file={root / 'run' / 'munged.pid'}",
                f"--seed-file={root / 'state' / 'munge.seed'}",
            ],
            "munged",
        )
        _wait(sock.exists, "munged's socket")
        start(["slurmctld", "-D", "-i"], "slurmctld")
        _wait(lambda: _ok(["scontrol", "ping"], env, "UP"), "slurmctld up")
        start(["slurmd", "-D"], "slurmd")
        _wait(lambda: _ok(["sinfo", "-h", "-o", "%t"], env, "idle"), "the node idle")
        yield Cluster(root, env, partition)
    finally:
        subprocess.run(["scancel", "--user", user], env=env, capture_output=True, check=False)
        time.sleep(1)
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _ok(args: list[str], env: dict[str, str], want: str) -> bool:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False, timeout=20)
    return proc.returncode == 0 and want in proc.stdout
