"""The Snakemake workflow and the DVC pipeline, checked with the real tools (fast checks).

Every test works on a *fresh copy* of the repository (tracked + untracked-not-ignored files, a new
`git init`), with the `.test` convention of Snakemake: `.test/params.yaml` holds only the keys that
differ from params.yaml (2 datasets x 2 models, tiny) and is deep-merged into the copy's params.yaml,
so the test configuration can never drift from the real one. The end-to-end runs live in
tests/test_workflow_e2e.py (marked slow).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def tool_env() -> dict[str, str]:
    """The venv's tools (snakemake, dvc, vmddpm) first on PATH, no DVC analytics, quiet git."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.org",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.org",
    }


def run(*args: str, cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=tool_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def repo_files() -> list[str]:
    """What a clone would hold, plus files not committed yet (the working tree under review)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def make_fresh_repo(dest: Path, *, test_config: bool = True, commit: bool = True) -> Path:
    """Copy the repository to `dest`, apply the `.test` overrides to params.yaml, `git init`."""
    dest.mkdir(parents=True)
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    if test_config:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        overrides = yaml.safe_load((dest / ".test" / "params.yaml").read_text())
        (dest / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, overrides), sort_keys=False))
    run("git", "init", "-q", cwd=dest)
    if commit:
        run("git", "add", "-A", cwd=dest)
        run("git", "commit", "-q", "-m", "fresh copy", cwd=dest)
    return dest


def set_param(repo: Path, dotted: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def snakemake(
    repo: Path, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    return run(str(BIN / "snakemake"), *args, cwd=repo, check=check, timeout=timeout)


def dry_run_jobs(repo: Path, *args: str) -> dict[str, int]:
    """rule -> number of jobs a dry run would execute (empty: nothing to be done)."""
    proc = snakemake(repo, "--dry-run", "--quiet", "rules", *args)
    text = proc.stdout + proc.stderr
    jobs: dict[str, int] = {}
    if "Nothing to be done" in text:
        return jobs
    block = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def snakemake_outputs(repo: Path) -> set[str]:
    """Every output path of the Snakemake DAG (from a forced dry run's job summary)."""
    proc = snakemake(repo, "--dry-run", "--forceall", "--summary")
    outputs = set()
    for line in proc.stdout.splitlines():
        path = line.split("\t", 1)[0].strip()
        if "\t" in line and path and path != "output_file":
            outputs.add(path.rstrip("/"))
    return outputs


def dvc_outputs(repo: Path) -> set[str]:
    """Every out/metric/plot path of the DVC pipeline after templating (`dvc stage list` resolves it)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        outs = {str(Path(o.fs_path).relative_to(repo)) for stage in dvc_repo.index.stages for o in stage.outs}
    return outs


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fresh_repo(tmp_path_factory.mktemp("wf") / "repo")


def test_dag_outputs_match_dvc_yaml(fresh: Path) -> None:
    """No drift: Snakemake's DAG and dvc.yaml name the same outputs (the marker file of the final
    `dvc commit` rule is Snakemake bookkeeping, not data)."""
    smk = {p for p in snakemake_outputs(fresh) if not p.startswith("logs/")}
    dvc = dvc_outputs(fresh)
    assert smk == dvc, f"only in Snakemake: {sorted(smk - dvc)}; only in dvc.yaml: {sorted(dvc - smk)}"
    cfg = yaml.safe_load((fresh / "params.yaml").read_text())
    for ds in cfg["datasets"]:
        for model in cfg["models"]:
            assert f"runs/{ds}/{model}/metrics.json" in smk


def test_fresh_clone_schedules_every_stage(fresh: Path) -> None:
    """A committed file at an output path would be newer than its (absent) inputs on a fresh clone, and
    Snakemake, which goes by file times, would skip the whole DAG behind it."""
    committed = set(repo_files())
    outputs = dvc_outputs(fresh)
    clash = sorted(f for f in committed for o in outputs if f == o or f.startswith(o + "/"))
    assert not clash, f"committed files at pipeline output paths: {clash[:10]}"
    cfg = yaml.safe_load((fresh / "params.yaml").read_text())
    pairs = len(cfg["datasets"]) * len(cfg["models"])
    jobs = dry_run_jobs(fresh)
    assert {k: jobs.get(k) for k in ("train", "sample", "evaluate", "report")} == {
        "train": pairs,
        "sample": pairs,
        "evaluate": pairs,
        "report": 1,
    }, jobs


def test_lint_is_clean(fresh: Path) -> None:
    proc = snakemake(fresh, "--lint")
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


def test_dag_renders(fresh: Path) -> None:
    dot = snakemake(fresh, "--dag").stdout
    assert dot.lstrip().startswith("digraph")
    for rule in ("download", "prepare", "train", "sample", "evaluate", "report", "dvc_commit"):
        assert rule in dot
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
        assert "<svg" in svg


def test_use_conda_dry_run_is_accepted(fresh: Path) -> None:
    """Snakemake reads every rule's `conda:` file and plans the environments (needs a conda)."""
    if shutil.which("conda") is None and shutil.which("mamba") is None:
        pytest.skip("no conda/mamba on PATH: `snakemake --use-conda` cannot even dry-run without one")
    proc = snakemake(fresh, "--use-conda", "--dry-run")
    text = proc.stdout + proc.stderr
    assert "train" in text


def test_slurm_profile_dry_run(fresh: Path) -> None:
    proc = snakemake(fresh, "--profile", "workflow/profiles/slurm", "--dry-run")
    text = proc.stdout + proc.stderr
    assert "train" in text and "evaluate" in text
    # The profile switches to paper scale: the train jobs ask for a GPU.
    assert re.search(r"gpu=1", text), text[-2000:]


def test_default_profile_dry_run(fresh: Path) -> None:
    proc = snakemake(fresh, "--workflow-profile", "workflow/profiles/default", "--dry-run")
    assert "workflow/profiles/default" in proc.stdout + proc.stderr and "train" in proc.stdout


def test_env_files_are_valid_and_pinned() -> None:
    constraints = {
        line.split("==")[0].strip().lower(): line.split("==")[1].strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    for name in ("cpu", "cuda", "eval"):
        env = yaml.safe_load((ROOT / "env" / f"{name}.yaml").read_text())
        assert env["name"] == f"vmddpm-{name}"
        assert "conda-forge" in env["channels"]
        deps = env["dependencies"]
        assert any(str(d).startswith("python=") for d in deps)
        pip = next(d["pip"] for d in deps if isinstance(d, dict))
        assert "-c ../constraints.txt" in pip, f"env/{name}.yaml must pin through constraints.txt"
    assert "mamba-ssm" in constraints or "mamba_ssm" in constraints
    cuda_pip = next(
        d["pip"]
        for d in yaml.safe_load((ROOT / "env/cuda.yaml").read_text())["dependencies"]
        if isinstance(d, dict)
    )
    assert any("[cuda]" in p for p in cuda_pip)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("datasets", ["chestxray", "mnist"], "mnist"),
        ("models", ["vmddpm", "not_a_model"], "not_a_model"),
    ],
)
def test_bad_matrix_name_fails_before_any_job(
    tmp_path: Path, key: str, value: list[str], message: str
) -> None:
    repo = make_fresh_repo(tmp_path / "repo", commit=False)
    set_param(repo, key, value)
    proc = snakemake(repo, "--cores", "1", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in text
    assert "rule download" not in text and not (repo / "data").exists() and not (repo / "runs").exists()
