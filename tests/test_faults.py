"""The fault matrix (issue 16): every probe of a hostile user, reproduced with real processes, real files,
real signals and real file systems (tmpfs mounts for a read-only and a full disk), each asserting the
one-line message and that no finished artefact changed (sha256 of every file before and after).

A fault is one row of `FAULTS` below (the README counts them). One small project (acdc x vmddpm at the
`.test` sizes, through the real CLI) is built once; each test works on its own copy. Marked slow: a few
minutes on 2 cores. The orchestrator faults (Snakemake, DVC and SLURM killing a training job) live in
tests/test_resume_orchestrators.py.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ONE_THREAD_ENV, ROOT, run_cli, signalable
from tests.test_workflow import deep_merge
from vmddpm.contracts import EVAL_HISTORY, read_record

pytestmark = pytest.mark.slow

DS, M = "acdc", "vmddpm"

#: the fault matrix: (id, the issue's point, what is done) -> the test that does it
FAULTS = {
    "concurrent-download-x10": (2, "two downloads of one dataset at once, 10 times: never a partial tree"),
    "concurrent-download": (2, "a second download while the first holds the output"),
    "concurrent-prepare": (2, "a second prepare while the first holds the output"),
    "concurrent-train": (2, "a second train of one model while the first trains"),
    "concurrent-sample": (2, "a second sample of one folder while the first draws"),
    "concurrent-sweep": (2, "a second sweep of one model while the first sweeps"),
    "concurrent-evaluate": (2, "a second evaluate of one metrics.json while the first evaluates"),
    "concurrent-report": (2, "a second report while the first writes the tables"),
    "placed-raw-tree-changed": (3, "files deleted from / rewritten in a placed raw_dir"),
    "other-weights-same-step": (3, "a model retrained to the same step: old samples and old FID"),
    "diffusion-mismatch": (3, "sample --set diffusion.prediction_type=v_prediction on an epsilon model"),
    "resume-with-other-knobs": (3, "train --set train.lr=0.5 where a checkpoint of other knobs exists"),
    "eval-cache-empty": (4, "runs/.eval-cache/*.npz emptied"),
    "eval-cache-truncated": (4, "runs/.eval-cache/*.npz truncated"),
    "read-only-train": (5, "runs/ on a read-only file system: train"),
    "read-only-sample": (5, "runs/ on a read-only file system: sample"),
    "read-only-evaluate": (5, "runs/ on a read-only file system: evaluate"),
    "read-only-prepare": (5, "data/prepared on a read-only file system: prepare"),
    "read-only-report": (5, "results/ on a read-only file system: report"),
    "disk-full-at-checkpoint": (5, "runs/ full when a checkpoint is written (torch: unexpected pos)"),
    "file-for-folder-train": (5, "runs/acdc is a file: train"),
    "file-for-folder-sample": (5, "sample --out under a file"),
    "file-for-folder-prepare": (5, "data/prepared is a file: prepare"),
    "sigint-in-training": (5, "Ctrl-C during training with the numba scan"),
    "sigterm-in-training": (5, "SIGTERM during training (kill, a SLURM time limit)"),
    "kill-9-mlflow-running": (5, "kill -9 during training leaves the MLflow run RUNNING"),
    "sigint-in-evaluation": (5, "Ctrl-C during a training-time evaluation, tests run as a background job"),
    "lr-nan": (6, "--set train.lr=.nan"),
    "lr-inf": (6, "train.lr: .inf in params.yaml"),
    "percentiles-reversed": (6, "data.acdc.percentiles: [99, 1]"),
    "duplicate-key": (6, "a key given twice in params.yaml"),
    "binary-params": (6, "a binary file as params.yaml"),
    "bad-set-named": (6, "a bad value from --set is named as such, not as params.yaml"),
    "truncated-newest-checkpoint": (6, "the newest step checkpoint truncated"),
    "truncated-model-pt": (6, "model.pt truncated, then sample"),
    "corrupt-samples-meta": (6, "samples_meta.json corrupt beside drawn samples"),
}

OVERRIDES = {
    "datasets": [DS],
    "models": [M],
    "tracking": {"enabled": False},
    "scales": {
        "demo": {
            "train": {"steps": 4, "checkpoint_every": 2, "log_every": 2, "keep_checkpoints": 3},
            "eval": {"ddim_steps_sweep": [2]},
        }
    },
}


# --------------------------------------------------------------------------------------------- helpers
def cli(proj: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=proj, check=check, timeout=timeout, env=ONE_THREAD_ENV)


def popen(proj: Path, *args: str) -> subprocess.Popen:
    """`vmddpm ARGS` in `proj`, started to be signalled (conftest.signalable)."""
    return subprocess.Popen(
        signalable([sys.executable, "-m", "vmddpm", *args]),
        cwd=proj,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD_ENV},
    )


def error_line(proc: subprocess.CompletedProcess | tuple[int, str], command: str, code: int = 2) -> str:
    """The one error line of a failed command (no traceback, exactly one `vmddpm CMD: ` line)."""
    rc, err = (proc.returncode, proc.stderr) if not isinstance(proc, tuple) else proc
    assert rc == code, f"exit {rc}, expected {code}:\n{err[-3000:]}"
    assert "Traceback" not in err and "SystemError" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"vmddpm {command}: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def warnings(proc: subprocess.CompletedProcess, needle: str) -> list[str]:
    return [line for line in proc.stderr.splitlines() if " WARNING " in line and needle in line]


def snapshot(proj: Path) -> dict[str, str]:
    """sha256 of every finished artefact: data, runs (checkpoints included), tables and figures."""
    out = {}
    for top in ("data", "runs", "results/tables", "results/figures"):
        base = proj / top
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith(".lock"):
                out[str(p.relative_to(proj))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def clone(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


def wait_for(cond, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def holder(lock: Path) -> int | None:
    try:
        words = lock.read_text().split()
    except OSError:
        return None
    return int(words[0]) if words and words[0].isdigit() else None


def step_files(proj: Path) -> list[Path]:
    return sorted((proj / "runs" / DS / M / "checkpoints").glob("*/step_*.pt"))


def mlflow_runs(proj: Path, stage: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vmddpm")
    runs = client.search_runs([exp.experiment_id], max_results=100) if exp else []
    return sorted((r for r in runs if r.data.tags.get("stage") == stage), key=lambda r: r.info.start_time)


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64m", read_only: bool = False) -> Iterator[Path]:
    """`folder` on a fresh tmpfs of `size` holding a copy of what it held (then remounted read-only)."""
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    aside = folder.with_name(folder.name + ".aside")
    if folder.exists():
        folder.rename(aside)
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        if aside.exists():
            shutil.copytree(aside, folder, symlinks=True, dirs_exist_ok=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()
        if aside.exists():
            aside.rename(folder)


# ---------------------------------------------------------------------------------------- the project
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acdc x vmddpm at the .test sizes, downloaded, prepared, trained (4 steps, checkpoints at 2 and
    4), sampled, swept, evaluated and reported through the CLI."""
    proj = tmp_path_factory.mktemp("faults") / "proj"
    proj.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = deep_merge(params, yaml.safe_load((ROOT / ".test" / "params.yaml").read_text()))
    params = deep_merge(params, OVERRIDES)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for rel in ("results/paper/reference.csv", "results/benchmarks/scaling.json"):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, proj / rel)
    for stage in ("download", "prepare"):
        cli(proj, stage, "--dataset", DS)
    for stage in ("train", "sample", "sweep", "evaluate"):
        cli(proj, stage, "--dataset", DS, "--model", M)
    cli(proj, "report")
    return proj


@pytest.fixture
def proj(base: Path, tmp_path: Path) -> Path:
    return clone(base, tmp_path / "proj")


def test_every_fault_of_the_matrix_is_tried() -> None:
    """The README counts FAULTS: each one is tried by a test below, and nothing else is."""
    tried = (
        {"concurrent-download-x10", "placed-raw-tree-changed", "other-weights-same-step"}
        | {"diffusion-mismatch", "resume-with-other-knobs", "eval-cache-empty", "eval-cache-truncated"}
        | {"disk-full-at-checkpoint", "sigint-in-training", "sigterm-in-training", "kill-9-mlflow-running"}
        | {"sigint-in-evaluation"}
        | {"truncated-newest-checkpoint", "truncated-model-pt", "corrupt-samples-meta"}
        | {f"concurrent-{s}" for s in CONCURRENT}
        | {f"read-only-{s}" for s in READ_ONLY}
        | {f"file-for-folder-{s}" for s in FILE_FOR_FOLDER}
        | set(CONFIG_FAULTS)
    )
    assert tried == set(FAULTS)


# ------------------------------------------------------------------------- 2. one process per output
def test_concurrent_downloads_never_install_a_partial_tree(proj: Path) -> None:
    """concurrent-download-x10: the probe installed 5,006 of 5,280 files with the completion marker."""
    raw = proj / "data" / "raw" / "chestxray"
    overlapped = 0
    for _ in range(10):
        shutil.rmtree(raw, ignore_errors=True)
        procs = [popen(proj, "download", "--dataset", "chestxray") for _ in range(2)]
        results = [(p.pid, *p.communicate(timeout=300)) for p in procs]
        codes = [p.returncode for p in procs]
        assert 0 in codes, results
        for (pid, _, err), code in zip(results, codes, strict=True):
            if code != 0:
                other = next(q for q, _, _ in results if q != pid)
                line = error_line((code, err), "download")
                assert f"another `vmddpm download` (pid {other})" in line, line
                overlapped += 1
        marker = json.loads((raw / ".vmddpm-download.json").read_text())
        with zipfile.ZipFile(marker["archive"]) as zf:
            want = {n.rstrip("/") for n in zf.namelist() if not n.endswith("/")}
        have = {str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file() and p.name != marker_name()}
        assert have == want, f"{len(want - have)} files missing from the installed tree"
        temps = [p for p in raw.parent.glob(".chestxray.*") if not p.name.endswith(".lock")]
        assert not temps, f"a temporary folder was left behind: {temps}"
    assert overlapped > 0, "the two downloads never overlapped in 10 tries"


def marker_name() -> str:
    return ".vmddpm-download.json"


#: stage -> (command args, what to remove so that the stage has work, its lock file)
CONCURRENT = {
    "download": (("download", "--dataset", DS), ("data/raw/acdc",), "data/raw/.acdc.lock"),
    "prepare": (("prepare", "--dataset", DS), ("data/prepared/acdc",), "data/prepared/.acdc.lock"),
    "train": (
        ("train", "--dataset", DS, "--model", M),
        ("runs/acdc/vmddpm/train", "runs/acdc/vmddpm/checkpoints"),
        "runs/acdc/vmddpm/.train.lock",
    ),
    "sample": (
        ("sample", "--dataset", DS, "--model", M),
        ("runs/acdc/vmddpm/samples",),
        "runs/acdc/vmddpm/.samples.lock",
    ),
    "sweep": (
        ("sweep", "--dataset", DS, "--model", M),
        ("runs/acdc/vmddpm/ddim_sweep",),
        "runs/acdc/vmddpm/.ddim_sweep.lock",
    ),
    "evaluate": (
        ("evaluate", "--dataset", DS, "--model", M),
        ("runs/acdc/vmddpm/metrics.json",),
        "runs/acdc/vmddpm/.metrics.json.lock",
    ),
    "report": (("report",), ("results/tables",), "results/.tables.lock"),
}


@pytest.mark.parametrize("stage", list(CONCURRENT))
def test_second_run_of_a_stage_exits_with_one_line_naming_the_first(proj: Path, stage: str) -> None:
    """concurrent-<stage>: the first run is stopped (SIGSTOP) while it holds the output's lock; the
    second exits with one line naming its pid and changes nothing; the first then finishes."""
    args, remove, lock = CONCURRENT[stage]
    assert f"concurrent-{stage}" in FAULTS
    for rel in remove:
        target = proj / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    first = popen(proj, *args)
    try:
        wait_for(lambda: holder(proj / lock) == first.pid, f"{stage} to take its lock")
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(proj)
        second = cli(proj, *args, check=False)
        line = error_line(second, stage)
        assert f"another `vmddpm {stage}` (pid {first.pid}) is writing it" in line, line
        assert snapshot(proj) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]


# ------------------------------------------------------------------------------- 3. nothing stale
def test_placed_raw_tree_is_fingerprinted_by_its_files(proj: Path) -> None:
    """placed-raw-tree-changed: the probe deleted 40 files and corrupted one; prepare said 'already
    prepared'."""
    placed = proj / "placed"
    shutil.copytree(proj / "data" / "raw" / DS, placed)
    (placed / marker_name()).unlink()  # a tree placed by hand: no download marker vouches for it
    shutil.rmtree(proj / "data" / "prepared" / DS)
    sets = ("--set", f"data.{DS}.raw_dir={placed}")
    cli(proj, "prepare", "--dataset", DS, *sets)
    manifest = proj / "data" / "prepared" / DS / "manifest.csv"
    first = manifest.read_text()
    again = cli(proj, "prepare", "--dataset", DS, *sets)
    assert "already prepared" in again.stderr  # unchanged tree: a no-op
    patients = sorted(p for p in placed.rglob("patient*") if p.is_dir())
    shutil.rmtree(patients[0])  # a subject's files deleted
    victim = next(p for p in patients[1].rglob("*.nii.gz"))
    data = bytearray(victim.read_bytes())
    data[-8:] = b"\0" * 8  # rewritten in place: same size, new contents
    victim.write_bytes(bytes(data))
    redo = cli(proj, "prepare", "--dataset", DS, *sets, check=False)
    assert "already prepared" not in redo.stderr
    if redo.returncode == 0:  # the rewritten volume may still decode: then the tree is re-read
        assert manifest.read_text() != first and patients[0].name not in manifest.read_text()
    else:  # or the corrupted volume is named in one line
        assert victim.name in error_line(redo, "prepare")


def test_samples_of_other_weights_are_redrawn_and_never_evaluated(proj: Path) -> None:
    """other-weights-same-step: the probe retrained to the same step; sample kept the old images and
    evaluate the old FID."""
    run = proj / "runs" / DS / M
    old_meta = json.loads((run / "samples_meta.json").read_text())
    old_png = (run / "samples" / "000000.png").read_bytes()
    old_metrics = (run / "metrics.json").read_bytes()
    cli(proj, "train", "--dataset", DS, "--model", M, "--set", "train.lr=0.001")  # other weights, step 4
    model_sha = hashlib.sha256((run / "train" / "model.pt").read_bytes()).hexdigest()
    assert model_sha != old_meta["model_sha256"]
    stale = cli(proj, "evaluate", "--dataset", DS, "--model", M, check=False)
    line = error_line(stale, "evaluate")
    assert "retrained" in line and old_meta["model_sha256"][:12] in line and "vmddpm sample" in line
    assert (run / "metrics.json").read_bytes() == old_metrics  # the finished metrics are untouched
    redrawn = cli(proj, "sample", "--dataset", DS, "--model", M)
    assert len(warnings(redrawn, "drawn from other weights")) == 1
    meta = json.loads((run / "samples_meta.json").read_text())
    assert meta["model_sha256"] == model_sha and meta["checkpoint_step"] == old_meta["checkpoint_step"]
    assert (run / "samples" / "000000.png").read_bytes() != old_png
    cli(proj, "evaluate", "--dataset", DS, "--model", M)
    assert read_record(run / "metrics.json")["model_sha256"] == model_sha  # protocol.json beside it


def test_sampling_with_another_diffusion_process_is_refused(proj: Path) -> None:
    """diffusion-mismatch: the probe sampled an epsilon model as v_prediction."""
    before = snapshot(proj)
    sets = ("--set", "diffusion.prediction_type=v_prediction")
    line = error_line(cli(proj, "sample", "--dataset", DS, "--model", M, *sets, check=False), "sample")
    assert "diffusion.prediction_type: checkpoint 'epsilon' != config 'v_prediction'" in line
    assert snapshot(proj) == before


def test_resume_with_other_knobs_trains_them_from_step_0_and_says_so(proj: Path) -> None:
    """resume-with-other-knobs: the probe resumed with --set train.lr=0.5, which training ignored and
    MLflow recorded. Now the checkpoint's knobs are compared: other knobs are a new run from step 0
    (one warning names them), the old checkpoints are kept, and the model records what it used."""
    old = {p: p.read_bytes() for p in step_files(proj)}
    lr = yaml.safe_load((proj / "params.yaml").read_text())["train"]["lr"]
    proc = cli(proj, "train", "--dataset", DS, "--model", M, "--set", "train.lr=0.5")
    said = warnings(proc, "no checkpoint for these knobs, training from step 0")
    assert len(said) == 1 and f"train.lr {lr!r} -> 0.5" in said[0], proc.stderr[-2000:]
    assert all(p.read_bytes() == data for p, data in old.items())
    final = torch.load(proj / "runs" / DS / M / "train" / "model.pt", weights_only=True)
    assert final["knobs"]["train.lr"] == 0.5 and final["config"]["train"]["lr"] == 0.5
    longer = cli(proj, "train", "--dataset", DS, "--model", M, "--set", "train.steps=6")  # same knobs
    assert re.search(r"resuming from .*step_00000004\.pt \(step 4\)", longer.stderr), longer.stderr[-2000:]


# ------------------------------------------------------------------- 4. a corrupt evaluation cache
@pytest.mark.parametrize("fault", ["eval-cache-empty", "eval-cache-truncated"])
def test_corrupt_evaluation_cache_is_recomputed_with_a_warning(proj: Path, fault: str) -> None:
    (cache,) = (proj / "runs" / ".eval-cache").glob("*.npz")
    metrics = json.loads((proj / "runs" / DS / M / "metrics.json").read_text())
    cache.write_bytes(b"" if fault == "eval-cache-empty" else cache.read_bytes()[:200])
    proc = cli(proj, "evaluate", "--dataset", DS, "--model", M)
    said = warnings(proc, "unreadable reference cache")
    assert len(said) == 1 and cache.name in said[0] and "recomputing" in said[0]
    again = json.loads((proj / "runs" / DS / M / "metrics.json").read_text())
    assert again["fid"] == metrics["fid"] and again["kid_mean"] == metrics["kid_mean"]
    assert not warnings(cli(proj, "evaluate", "--dataset", DS, "--model", M), "unreadable")  # rewritten


# --------------------------------------------------------------------- 5. operating-system faults
READ_ONLY = {
    "train": ("runs", ("train", "--dataset", DS, "--model", M, "--set", "train.steps=8")),
    "sample": ("runs", ("sample", "--dataset", DS, "--model", M, "--set", "sample.n_images=20")),
    "evaluate": ("runs", ("evaluate", "--dataset", DS, "--model", M)),
    "prepare": (
        "data/prepared",
        ("prepare", "--dataset", DS, "--set", "data.split.val=0.2", "--set", "data.split.train=0.7"),
    ),
    "report": ("results", ("report",)),
}


@pytest.mark.parametrize("stage", list(READ_ONLY))
def test_read_only_output_is_one_line_before_any_compute(proj: Path, stage: str) -> None:
    """read-only-<stage>: the probe got a traceback, for train only at the first checkpoint."""
    assert f"read-only-{stage}" in FAULTS
    mount, args = READ_ONLY[stage]
    with tmpfs(proj / mount, read_only=True):
        before = snapshot(proj)
        t0 = time.time()
        proc = cli(proj, *args, check=False)
        line = error_line(proc, stage)
        assert "read-only file system" in line and str(proj / mount) in line, line
        assert snapshot(proj) == before
    assert "training vmddpm" not in proc.stderr and "extracting reference features" not in proc.stderr
    assert time.time() - t0 < 60


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(proj: Path) -> None:
    """disk-full-at-checkpoint: the probe got torch's `unexpected pos` traceback."""
    with tmpfs(proj / "runs", size="16m") as runs:
        free = shutil.disk_usage(runs).free
        with open(runs / "filler", "wb") as fh:  # leave 256 KiB: enough for the writability probe
            fh.write(b"\0" * (free - (256 << 10)))
        before = {k: v for k, v in snapshot(proj).items() if k != "runs/filler"}
        proc = cli(
            proj,
            "train",
            "--dataset",
            DS,
            "--model",
            M,
            "--set",
            "train.steps=8",
            "--set",
            "train.checkpoint_every=1",
            check=False,
        )
        line = error_line(proc, "train")
        assert "no space left on device" in line and "step_00000005.pt" in line, line
        after = {k: v for k, v in snapshot(proj).items() if k != "runs/filler"}
        changed = {k for k in before if after.get(k) != before[k]}
        assert not changed, changed  # step 2 and 4, model.pt, samples, metrics: all as they were
        assert not [p for p in runs.rglob(".step_*")], "a temporary checkpoint was left behind"


FILE_FOR_FOLDER = {
    "train": ("runs/acdc", ("train", "--dataset", DS, "--model", M)),
    "sample": ("elsewhere", ("sample", "--dataset", DS, "--model", M, "--out", "{proj}/elsewhere/samples")),
    "prepare": ("data/prepared", ("prepare", "--dataset", DS)),
}


@pytest.mark.parametrize("stage", list(FILE_FOR_FOLDER))
def test_a_file_where_a_folder_should_be_is_named(proj: Path, stage: str) -> None:
    assert f"file-for-folder-{stage}" in FAULTS
    rel, args = FILE_FOR_FOLDER[stage]
    blocker = proj / rel
    if blocker.is_dir():
        shutil.move(blocker, blocker.with_name(blocker.name + ".moved"))
    blocker.write_text("not a folder\n")
    before = snapshot(proj)
    line = error_line(cli(proj, *(a.format(proj=proj) for a in args), check=False), stage)
    assert f"{blocker}: a file where a folder should be" in line, line
    assert snapshot(proj) == before


LONG = ("--set", "train.steps=100000", "--set", "train.checkpoint_every=5", "--set", "model.scan_backend=cpu")


@pytest.mark.parametrize(
    ("fault", "sig", "code"),
    [("sigint-in-training", signal.SIGINT, 130), ("sigterm-in-training", signal.SIGTERM, 143)],
)
def test_a_signal_ends_training_cleanly(proj: Path, fault: str, sig: int, code: int) -> None:
    """The probe's Ctrl-C inside the numba scan gave a SystemError chain (or was lost); SIGTERM left the
    MLflow run RUNNING. Now: the step in progress ends, its checkpoint is written, the run is KILLED."""
    assert fault in FAULTS
    shutil.rmtree(proj / "runs" / DS / M / "checkpoints")
    proc = popen(proj, "train", "--dataset", DS, "--model", M, "--set", "tracking.enabled=true", *LONG)
    wait_for(lambda: len(step_files(proj)) >= 1, "the first checkpoint")
    time.sleep(0.7)  # mid-run, most of it inside the numba kernels
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    line = error_line((proc.returncode, err), "train", code=code)
    assert f"stopped by {signal.Signals(sig).name}; finished outputs are kept, rerun to resume" in line
    stopped = re.search(r"stopped by \w+ at step (\d+); checkpoint written", err)
    assert stopped, err[-2000:]
    step = int(stopped.group(1))
    assert step_files(proj)[-1].name == f"step_{step:08d}.pt"
    (run,) = mlflow_runs(proj, "train")
    assert run.info.status == "KILLED"


def test_sigint_during_an_evaluation_ends_training_cleanly_from_a_background_test_run(proj: Path) -> None:
    """sigint-in-evaluation: with `train.eval_every` on, the SIGINT tests failed in a `make test` started
    as a background job (`make test > log &`): such a shell starts its job with SIGINT ignored, every
    process inherits that, and `vmddpm` keeps an inherited SIG_IGN, so the training ignored the signal
    and ran on. Here the test process ignores SIGINT the same way while it starts the run; the SIGINT
    lands in an evaluation during training (after that evaluation's feature-extraction bar has
    started), which finishes, and the step is checkpointed with its evaluation row."""
    shutil.rmtree(proj / "runs" / DS / M / "checkpoints")
    evals = ("--set", "train.eval_every=5", "--set", "tracking.enabled=true")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `make test &` leaves every process
    try:
        proc = popen(proj, "train", "--dataset", DS, "--model", M, *evals, *LONG)
    finally:
        signal.signal(signal.SIGINT, previous)
    lines: list[str] = []
    in_eval = threading.Event()

    def read() -> None:  # text mode: tqdm's \r updates come as lines too
        after_step_5 = False
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            after_step_5 = after_step_5 or "eval at step 5:" in line
            if after_step_5 and "training-eval features" in line:  # inside the evaluation at step >= 10
                in_eval.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert in_eval.wait(120), "no evaluation after step 5:\n" + "\n".join(lines[-30:])
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
    err = "\n".join(lines)
    line = error_line((proc.returncode, err), "train", code=130)
    assert "stopped by SIGINT; finished outputs are kept, rerun to resume" in line
    stopped = re.search(r"stopped by SIGINT at step (\d+); checkpoint written", err)
    assert stopped, err[-2000:]
    step = int(stopped.group(1))
    assert step >= 10 and step_files(proj)[-1].name == f"step_{step:08d}.pt"
    with open(proj / "runs" / DS / M / "train" / EVAL_HISTORY) as fh:
        evaluated = [int(r["step"]) for r in csv.DictReader(fh)]
    assert 5 in evaluated and step // 5 * 5 in evaluated, evaluated  # the interrupted evaluation's row
    (run,) = mlflow_runs(proj, "train")
    assert run.info.status == "KILLED"


def test_kill_9_leaves_a_running_mlflow_run_that_the_next_run_marks_failed(proj: Path) -> None:
    """kill-9-mlflow-running: a process killed with no chance to close its run."""
    shutil.rmtree(proj / "runs" / DS / M / "checkpoints")
    proc = popen(proj, "train", "--dataset", DS, "--model", M, "--set", "tracking.enabled=true", *LONG)
    wait_for(lambda: len(step_files(proj)) >= 1, "the first checkpoint")
    proc.kill()
    proc.communicate()
    (run,) = mlflow_runs(proj, "train")
    assert run.info.status == "RUNNING"
    step = int(step_files(proj)[-1].name[5:13])
    sets = ("--set", "tracking.enabled=true", "--set", f"train.steps={step + 1}", *LONG[2:])
    rerun = cli(proj, "train", "--dataset", DS, "--model", M, *sets)
    assert len(warnings(rerun, "left RUNNING by a killed process; marked FAILED")) == 1
    old, new = mlflow_runs(proj, "train")
    assert old.info.status == "FAILED" and "vmddpm.stale" in old.data.tags
    assert new.info.status == "FINISHED" and new.data.params["resumed_from_step"] == str(step)


# ------------------------------------------------------------------------------ 6. the smaller ones
def _params_edit(proj: Path, fault: str) -> tuple[str, ...]:
    """Apply `fault` to the project's params.yaml (or return the --set that carries it)."""
    params = proj / "params.yaml"
    text = params.read_text()
    if fault == "lr-nan":
        return ("--set", "train.lr=.nan")
    if fault == "lr-inf":
        params.write_text(re.sub(r"(?m)^  lr: .*$", "  lr: .inf", text, count=1))
    elif fault == "percentiles-reversed":
        doc = yaml.safe_load(text)
        doc["data"]["acdc"]["percentiles"] = [99, 1]
        params.write_text(yaml.safe_dump(doc, sort_keys=False))
    elif fault == "duplicate-key":
        params.write_text(text.replace("\nseed: 0\n", "\nseed: 0\nseed: 1\n", 1))
    elif fault == "binary-params":
        params.write_bytes(bytes(range(256)) * 4)
    elif fault == "bad-set-named":
        return ("--set", "train.batch_size=0")
    return ()


CONFIG_FAULTS = {
    "lr-nan": "--set train.lr=.nan: train.lr must be a finite number, got nan",
    "lr-inf": "params.yaml: train.lr must be a finite number, got inf",
    "percentiles-reversed": "params.yaml: data.acdc.percentiles must be [low, high] with 0 <= low < high",
    "duplicate-key": "params.yaml: seed is given twice (lines",
    "binary-params": "params.yaml: not a text file (byte 0x80 at offset 128 is not UTF-8)",
    "bad-set-named": "--set train.batch_size=0: train.batch_size must be >= 1, got 0",
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_config_faults_are_one_line_before_anything_runs(proj: Path, fault: str) -> None:
    assert fault in FAULTS
    sets = _params_edit(proj, fault)
    before = snapshot(proj)
    line = error_line(cli(proj, "train", "--dataset", DS, "--model", M, *sets, check=False), "train")
    assert CONFIG_FAULTS[fault] in line, line
    assert snapshot(proj) == before


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(proj: Path) -> None:
    """truncated-newest-checkpoint: the probe was told to delete last.pt 'to resume from an earlier
    checkpoint', but none was kept. Now K are kept and the newest that loads is used, with a warning."""
    train = proj / "runs" / DS / M / "train"
    final = torch.load(train / "model.pt", weights_only=True)
    newest = step_files(proj)[-1]
    assert newest.name == "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    shutil.rmtree(train)  # what Snakemake and dvc repro do before they rerun the job
    proc = cli(proj, "train", "--dataset", DS, "--model", M)
    said = warnings(proc, "truncated or corrupt checkpoint")
    assert len(said) == 1 and "step_00000004.pt" in said[0] and "falling back to an older one" in said[0]
    assert "(step 2)" in proc.stderr
    again = torch.load(train / "model.pt", weights_only=True)
    for key in ("model", "ema"):  # resumed at 2, retrained to 4: bit-identical to the first run
        assert all(torch.equal(again[key][k], final[key][k]) for k in final[key])


def test_truncated_model_pt_is_one_line_and_its_advice_works(proj: Path) -> None:
    """truncated-model-pt"""
    model = proj / "runs" / DS / M / "train" / "model.pt"
    model.write_bytes(model.read_bytes()[:4096])
    before = snapshot(proj)
    line = error_line(cli(proj, "sample", "--dataset", DS, "--model", M, check=False), "sample")
    assert (
        f"{model}: truncated or corrupt checkpoint" in line and "delete it and rerun `vmddpm train`" in line
    )
    assert snapshot(proj) == before
    model.unlink()
    proc = cli(proj, "train", "--dataset", DS, "--model", M)
    assert "(step 4)" in proc.stderr  # the final state in the store: no step retrained
    cli(proj, "sample", "--dataset", DS, "--model", M)


def test_corrupt_samples_meta_is_one_line_and_deletes_nothing(proj: Path) -> None:
    """corrupt-samples-meta: how the images beside it were drawn is unknown; they are never deleted."""
    meta = proj / "runs" / DS / M / "samples_meta.json"
    meta.write_text('{"dataset": "acdc", "model"')
    before = snapshot(proj)
    line = error_line(cli(proj, "sample", "--dataset", DS, "--model", M, check=False), "sample")
    assert "samples_meta.json is missing or unreadable" in line
    assert snapshot(proj) == before
