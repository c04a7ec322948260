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
        merge_keeping_layout(
            dest / "params.yaml", yaml.safe_load((dest / ".test" / "params.yaml").read_text())
        )
        run(str(BIN / "vmddpm"), "config", "dvc", "--write", cwd=dest)  # dvc.yaml follows the matrix
    run("git", "init", "-q", cwd=dest)
    if commit:
        run("git", "add", "-A", cwd=dest)
        run("git", "commit", "-q", "-m", "fresh copy", cwd=dest)
    return dest


def merge_keeping_layout(path: Path, overrides: dict) -> None:
    """Deep-merge `overrides` into the YAML file at `path` with DVC's own round-trip writer (what
    `dvc exp run -S` uses), so the file keeps params.yaml's layout and comments."""
    from dvc.utils.serialize import modify_yaml

    def merge(node, over):
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            else:
                node[key] = value

    with modify_yaml(str(path)) as doc:
        merge(doc, overrides)


def set_param(repo: Path, dotted: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def narrow(repo: Path, datasets: list[str], models: list[str]) -> None:
    """Reduce the experiment matrix of a fresh copy and regenerate its dvc.yaml (which follows it)."""
    set_param(repo, "datasets", datasets)
    set_param(repo, "models", models)
    run(str(BIN / "vmddpm"), "config", "dvc", "--write", cwd=repo)


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
    for rule in ("download", "prepare", "train", "sample", "sweep", "evaluate", "report", "dvc_commit"):
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


def test_plain_snakemake_uses_the_default_profile(fresh: Path) -> None:
    """Snakemake >= 8 reads `profiles/default` beside the Snakefile (workflow/Snakefile, the catalog's
    layout) with no flag: `cores: all` etc. come from workflow/profiles/default/config.yaml."""
    proc = snakemake(fresh, "--dry-run")
    text = proc.stdout + proc.stderr
    assert "Using workflow specific profile workflow/profiles/default" in text and "train" in text


def test_catalog_layout() -> None:
    """The Snakemake workflow catalog's "standardized usage": workflow/Snakefile, config/README.md and
    .snakemake-workflow-catalog.yml (params.yaml stays at the root: it is DVC's file too)."""
    assert (ROOT / "workflow" / "Snakefile").is_file() and not (ROOT / "Snakefile").exists()
    assert "params.yaml" in (ROOT / "config" / "README.md").read_text()
    usage = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert usage["software-stack-deployment"]["conda"] is True and usage["report"] is True


def test_config_selects_the_matrix(fresh: Path) -> None:
    """Acceptance 1: `--config datasets=[..] models=[..]` schedules only those jobs, and the jobs get the
    override as `vmddpm --set` (the CLI resolves the same config)."""
    jobs = dry_run_jobs(fresh, "--config", "datasets=[acdc]", "models=[vmddpm]")
    assert jobs == {
        "download": 1, "prepare": 1, "train": 1, "sample": 1, "sweep": 1, "evaluate": 1,
        "report": 1, "dvc_commit": 1, "all": 1,
    }  # fmt: skip
    proc = snakemake(fresh, "--dry-run", "--printshellcmds", "--config", "datasets=[acdc]", "models=[vmddpm]")
    assert "vmddpm --params params.yaml --scale demo --set 'datasets=[\"acdc\"]'" in proc.stdout
    assert "train --dataset acdc --model vmddpm" in proc.stdout
    assert "--dataset chestxray" not in proc.stdout


def test_configfile_is_a_partial_params_yaml(tmp_path: Path) -> None:
    """`--configfile` deep-merges a partial params.yaml (the `.test` one here) over params.yaml."""
    repo = make_fresh_repo(tmp_path / "repo", test_config=False, commit=False)
    over = yaml.safe_load((repo / ".test" / "params.yaml").read_text())
    jobs = dry_run_jobs(repo, "--configfile", ".test/params.yaml")
    n = len(over["datasets"]) * len(over["models"])
    assert jobs["train"] == n and jobs["evaluate"] == n and jobs["download"] == len(over["datasets"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("model={sr: zig}", "model.sr must be one of none | window | zigzag | random, got 'zig'; did you mean zigzag?"),  # noqa: E501
        ("train={lr_rate: 1}", "train.lr_rate is not a known key; did you mean train.lr?"),
        ("models=[vmddpm, vmdpm]", "models[1]=vmdpm is not a known model (a key of presets); did you mean vmddpm?"),  # noqa: E501
    ],
)  # fmt: skip
def test_bad_config_override_is_the_clis_one_line_error(fresh: Path, config: str, message: str) -> None:
    proc = snakemake(fresh, "--dry-run", "--config", config, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if message in ln]
    assert lines == [f"params.yaml + --config/--configfile: {message}"], (proc.stdout + proc.stderr)[-2000:]


def test_params_yaml_keeps_its_layout_under_dvcs_writer(tmp_path: Path) -> None:
    """`dvc exp run -S key=value` rewrites params.yaml with DVC's own writer (ruamel.yaml round trip,
    every list replaced by a plain one): params.yaml is shaped so that one key is one changed line, its
    comments kept."""
    from dvc.utils.hydra import apply_overrides

    for override, line in (
        ("model.sr=zigzag", "  sr: zigzag # none | window | zigzag | random"),
        ("scales.demo.train.steps=40", "      steps: 40"),
        ("data.acdc.archive=/data/acdc.zip", "    archive: /data/acdc.zip"),
        ("eval.ddim_steps_sweep=[10,25,50,101]", "  - 101"),
        ("presets.vmddpm_csm.model.sr=random", "  vmddpm_csm: {family: vmunet, model: {sr: random}}"),
    ):
        path = tmp_path / "params.yaml"
        shutil.copy(ROOT / "params.yaml", path)
        apply_overrides(str(path), [override])
        before, after = (ROOT / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
        assert len(before) == len(after), override
        diff = [b for a, b in zip(before, after, strict=True) if a != b]
        assert diff == [line], (override, diff)


def test_env_files_survive_snakemake_copying_them(tmp_path: Path) -> None:
    """Acceptance 3. Snakemake copies an env file to .snakemake/conda/<hash>_.yaml and runs `conda env
    create --file` on the copy; conda writes the `pip:` entries to a requirements file in the copy's
    folder and runs pip there. Reproduce that copy (Snakemake's own copy function), then resolve every
    path in it with pip's own requirements parser, VMDDPM_ROOT set as workflow/rules/common.smk sets it."""
    import hashlib

    from pip._internal.network.session import PipSession
    from pip._internal.req.req_file import parse_requirements
    from snakemake.common import copy_permission_safe

    root = ROOT.resolve()
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert 'os.environ["VMDDPM_ROOT"] = str(Path(workflow.basedir).resolve().parent)' in common
    envs = sorted((ROOT / "workflow" / "envs").glob("*.yaml"))
    assert {e.stem for e in envs} == {"cpu", "cuda", "eval"}

    def resolve(reqs: Path) -> list:
        old = os.getcwd()
        os.chdir(reqs.parent)  # conda runs pip in the env file's folder
        os.environ["VMDDPM_ROOT"] = str(root)
        try:
            return list(parse_requirements(str(reqs), session=PipSession(), constraint=False))
        finally:
            os.chdir(old)
            os.environ.pop("VMDDPM_ROOT", None)

    for env in envs:
        spec = yaml.safe_load(env.read_text())
        assert spec["name"] == f"vmddpm-{env.stem}" and "conda-forge" in spec["channels"]
        copy = tmp_path / ".snakemake" / "conda" / f"{hashlib.md5(env.read_bytes()).hexdigest()}_.yaml"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy_permission_safe(str(env), str(copy))
        pip = next(d["pip"] for d in yaml.safe_load(copy.read_text())["dependencies"] if isinstance(d, dict))
        reqs = copy.parent / f"condaenv.{env.stem}.requirements.txt"
        reqs.write_text("\n".join(pip) + "\n")
        parsed = resolve(reqs)  # opens every -c / -r file it names: a missing one raises
        (editable,) = [r for r in parsed if r.is_editable]
        target = Path(editable.requirement.split("[")[0])
        assert target.resolve() == root and (target / "pyproject.toml").is_file(), (env.name, target)
        assert any(p.startswith("-c ${VMDDPM_ROOT}/constraints.txt") for p in pip), env.name
        assert not any(".." in p for p in pip), (env.name, pip)  # nothing relative to the copy
        if env.stem == "cuda":
            assert editable.requirement.endswith("[cuda]")
    # the old style: '-c ../constraints.txt' from .snakemake/conda/ names .snakemake/constraints.txt
    old = tmp_path / ".snakemake" / "conda" / "condaenv.old.requirements.txt"
    old.write_text("-c ../constraints.txt\n-e ..\n")
    with pytest.raises(Exception, match=r"constraints\.txt"):
        resolve(old)


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
