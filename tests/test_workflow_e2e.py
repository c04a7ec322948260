"""End-to-end: the `.test` matrix (2 datasets x 2 models, tiny) through Snakemake, DVC and MLflow.

One Snakemake run on a fresh copy of the repository backs several checks (the run is the expensive
part); `dvc repro` runs on a second fresh copy. Marked slow: a few minutes on 2 cores.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml

from . import test_workflow as wf

pytestmark = pytest.mark.slow

STAGES = ("train", "sample", "evaluate")


def files_under(repo: Path, *tops: str) -> set[str]:
    """Relative paths of every file under the given output folders (what a stage produced)."""
    out: set[str] = set()
    for top in tops:
        for p in (repo / top).rglob("*"):
            if p.is_file() and p.name != ".snakemake_timestamp":  # Snakemake bookkeeping, .dvcignore'd
                out.add(str(p.relative_to(repo)))
    return out


def matrix(repo: Path) -> tuple[list[str], list[str]]:
    cfg = yaml.safe_load((repo / "params.yaml").read_text())
    return cfg["datasets"], cfg["models"]


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy after one full `snakemake --cores 2` run."""
    repo = wf.make_fresh_repo(tmp_path_factory.mktemp("e2e") / "repo")
    wf.snakemake(repo, "--cores", "2", timeout=1500)
    return repo


def test_snakemake_runs_every_stage_and_reports_every_pair(done: Path) -> None:
    datasets, models = matrix(done)
    for ds in datasets:
        assert (done / "data/raw" / ds).is_dir()
        assert (done / "data/prepared" / ds / "manifest.csv").is_file()
        for model in models:
            assert any((done / "runs" / ds / model / "train").iterdir())
            assert any((done / "runs" / ds / model / "samples").glob("*.png"))
            assert (done / "runs" / ds / model / "metrics.json").is_file()
    main_md = (done / "results/tables/main.md").read_text()
    rows = list(csv.DictReader(io.StringIO((done / "results/tables/main.csv").read_text())))
    for ds in datasets:
        for model in models:
            section = main_md.split(f"## {ds}\n", 1)[1].split("\n## ", 1)[0]
            assert any(f"| {model} |" in line for line in section.splitlines()), (
                f"no row for {ds}/{model} in main.md"
            )
            assert any(ds in r.values() and model in r.values() for r in rows), (
                f"no row for {ds}/{model} in main.csv"
            )
    assert any((done / "results/figures").glob("*.png"))


def test_demo_snapshot_copies_the_reports_outputs(done: Path) -> None:
    """`make demo-snapshot` is how the committed results/demo/ is refreshed from a run."""
    wf.run("make", "demo-snapshot", cwd=done)
    for sub in ("tables", "figures"):
        made = {
            p.name: p.read_bytes()
            for p in (done / "results" / sub).iterdir()
            if p.name != ".snakemake_timestamp"
        }
        copied = {p.name: p.read_bytes() for p in (done / "results/demo" / sub).iterdir()}
        assert made and copied == made, (sub, sorted(set(made) ^ set(copied)))
    assert wf.dry_run_jobs(done) == {}  # the snapshot is not an input or output of the pipeline


def test_second_run_does_nothing(done: Path) -> None:
    assert wf.dry_run_jobs(done) == {}


def test_changed_train_steps_reruns_only_train_and_downstream(done: Path) -> None:
    datasets, models = matrix(done)
    before = (done / "params.yaml").read_text()
    steps = yaml.safe_load(before)["scales"]["demo"]["train"]["steps"]
    try:
        wf.set_param(done, "scales.demo.train.steps", steps + 1)
        jobs = wf.dry_run_jobs(done)
    finally:
        (done / "params.yaml").write_text(before)
    pairs = len(datasets) * len(models)
    assert "download" not in jobs and "prepare" not in jobs, jobs
    assert jobs.get("train") == pairs and jobs.get("sample") == pairs and jobs.get("evaluate") == pairs, jobs
    assert jobs.get("report") == 1 and jobs.get("dvc_commit") == 1, jobs


def test_changed_cpu_memory_reruns_nothing(done: Path) -> None:
    """`cpu_memory` changes speed and resident memory only: neither Snakemake nor DVC reruns a job."""
    before = (done / "params.yaml").read_text()
    try:
        wf.set_param(done, "cpu_memory", "release")
        jobs = wf.dry_run_jobs(done)
        status = wf.run("dvc", "status", cwd=done).stdout
    finally:
        (done / "params.yaml").write_text(before)
    assert jobs == {}
    assert "up to date" in status.lower(), status


def test_mlflow_holds_one_tagged_run_per_job(done: Path) -> None:
    from mlflow.tracking import MlflowClient

    datasets, models = matrix(done)
    client = MlflowClient(tracking_uri=f"sqlite:///{done / 'mlflow.db'}")
    exp = client.get_experiment_by_name(
        yaml.safe_load((done / "params.yaml").read_text())["tracking"]["experiment"]
    )
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    seen: dict[tuple[str, str, str], int] = {}
    for run in runs:
        tags = run.data.tags
        if tags.get("stage") in STAGES:
            key = (tags["stage"], tags.get("dataset"), tags.get("model"))
            seen[key] = seen.get(key, 0) + 1
    expected = {(s, ds, m): 1 for s in STAGES for ds in datasets for m in models}
    assert seen == expected
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("stage") in STAGES)


def test_dvc_status_clean_and_push_pull_restores(done: Path) -> None:
    status = wf.run("dvc", "status", cwd=done)
    assert "up to date" in status.stdout.lower(), status.stdout
    wf.run("dvc", "push", cwd=done)
    wf.run("git", "add", "-A", cwd=done)
    wf.run("git", "commit", "-q", "-m", "run", cwd=done)
    clone = done.parent / "clone"
    wf.run("git", "clone", "-q", str(done), str(clone), cwd=done.parent)
    wf.run("dvc", "pull", cwd=clone)
    tracked = (
        "data/raw",
        "data/prepared",
        *(f"runs/{d}" for d in matrix(done)[0]),
        "results/tables",
        "results/figures",
    )
    restored = files_under(clone, *tracked)
    # data/raw/archives/ holds download's fetched archives: a download cache, not a stage output; nor
    # are the step checkpoints beside each train folder (a resume cache) or the stages' lock files.
    original = {
        p
        for p in files_under(done, *tracked)
        if not p.startswith("data/raw/archives/") and "/checkpoints/" not in p and not p.endswith(".lock")
    }
    datasets, models = matrix(done)
    ckpts = {p for p in restored if p.startswith("runs/") and "/train/" in p}
    assert len({p.split("/train/")[0] for p in ckpts}) == len(datasets) * len(models)
    assert original and original <= restored, sorted(original - restored)[:20]
    for p in ckpts:
        assert (clone / p).read_bytes() == (done / p).read_bytes()
    assert wf.run("dvc", "status", cwd=clone).stdout.lower().count("up to date") == 1


def test_dvc_repro_on_fresh_copy_gives_the_same_outputs(done: Path, tmp_path: Path) -> None:
    repo = wf.make_fresh_repo(tmp_path / "repo")
    wf.run("dvc", "repro", cwd=repo, timeout=1500)
    tops = ("data/raw", "data/prepared", "runs", "results/tables", "results/figures")
    ignore = ("/.eval-cache/",)
    a = {p for p in files_under(repo, *tops) if not any(i in p for i in ignore)}
    b = {p for p in files_under(done, *tops) if not any(i in p for i in ignore)}
    assert a == b, f"only from dvc repro: {sorted(a - b)[:20]}; only from snakemake: {sorted(b - a)[:20]}"
    assert "up to date" in wf.run("dvc", "status", cwd=repo).stdout.lower()


def test_snakemake_report_holds_tables_and_figures(done: Path) -> None:
    wf.snakemake(done, "--report", "report.html")
    html = (done / "report.html").read_text(errors="replace")
    assert "main.md" in html and "ablation.csv" in html
    assert "figures" in html.lower()
