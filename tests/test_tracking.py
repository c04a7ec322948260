"""vmddpm.tracking against a real MLflow sqlite store: one run per invocation with the expected tags,
params, metrics and artifacts; parallel writers lose no run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD_ENV, TINY
from tests.test_train import DATASET, MODEL, write_prepared
from vmddpm.tracking import NullRun, local_artifacts, resolve_uri, retry, start_run

ROOT = Path(__file__).resolve().parents[1]


def _sets(*items: str) -> list[str]:
    out: list[str] = []
    for item in (*TINY, *items):
        if item.startswith("tracking.enabled"):
            continue
        out += ["--set", item]
    return out


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_prepared(folder / "data" / "prepared" / DATASET)
    return folder


def _runs(db: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=["vmddpm"], output_format="pandas")


def test_one_run_per_invocation(tmp_path: Path, cli) -> None:
    project = _project(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"  # run from another cwd: the store still lands beside params.yaml
    elsewhere.mkdir()
    params = ["--params", str(project / "params.yaml")]
    train_sets = _sets(
        "train.steps=4",
        "train.log_every=2",
        "train.sample_every=4",
        "train.sample_grid=4",
        "sample.steps=4",
        "sample.n_images=4",
    )
    job = ("--dataset", DATASET, "--model", MODEL, *params, *train_sets)
    for stage in ("train", "sample", "train"):  # the second train is a no-op
        cli(stage, *job, cwd=elsewhere, env=ONE_THREAD_ENV)
    db = project / "mlflow.db"
    assert db.is_file() and not (elsewhere / "mlflow.db").exists()

    runs = _runs(db)
    assert sorted(runs["tags.stage"]) == ["sample", "train"]  # the no-op re-run starts no run
    assert set(runs["status"]) == {"FINISHED"}
    for _, run in runs.iterrows():
        assert run["tags.dataset"] == DATASET and run["tags.model"] == MODEL and run["tags.scale"] == "demo"
        assert run["params.train.steps"] == "4" and run["params.diffusion.timesteps"] == "1000"
        assert run.get("tags.scan_backend")
        if (ROOT / ".git").exists():
            assert len(run["tags.git_commit"]) == 40

    from mlflow.tracking import MlflowClient

    local_artifacts()  # the store's artifact locations are relative (mlflow-artifacts:/...)
    client = MlflowClient(f"sqlite:///{db}")
    train_run = runs[runs["tags.stage"] == "train"].iloc[0]
    loss = client.get_metric_history(train_run["run_id"], "loss")
    assert [m.step for m in loss] == [2, 4]
    assert [m.step for m in client.get_metric_history(train_run["run_id"], "lr")] == [2, 4]
    rss = client.get_metric_history(train_run["run_id"], "peak_rss_mb")  # host memory, per log step
    assert [m.step for m in rss] == [2, 4] and 50 < rss[0].value <= rss[1].value
    arts = {a.path for a in client.list_artifacts(train_run["run_id"])}
    assert {"history.csv", "checkpoint.txt", "grids"} <= arts
    assert train_run["tags.checkpoint"] == f"runs/{DATASET}/{MODEL}/train/model.pt"  # relative
    assert (project / "mlartifacts").is_dir()
    # the experiment opens on its runs in `mlflow ui`, its artifacts are relative to mlflow ui's root
    exp = client.get_experiment_by_name("vmddpm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == "mlflow-artifacts:/vmddpm"
    assert len(set(runs["tags.mlflow.runName"])) == len(runs)  # unique names
    if (ROOT / ".git").exists():
        assert set(runs["tags.git_dirty"]) <= {"true", "false"}
    # the trained EMA model: logged by the train run, registered per dataset/model, loadable
    import mlflow.pytorch
    import torch

    (logged,) = client.search_logged_models([exp.experiment_id])
    assert logged.source_run_id == train_run["run_id"] and logged.name == "ema"
    (version,) = client.search_model_versions(f"name = 'vmddpm-{DATASET}-{MODEL}'")
    assert version.run_id == train_run["run_id"] and version.source == f"models:/{logged.model_id}"
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    net = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    assert isinstance(net, torch.nn.Module)
    ids = json.loads((project / "runs" / DATASET / MODEL / "train" / "mlflow_run.json").read_text())
    assert ids == {"run_id": train_run["run_id"], "model_id": logged.model_id}

    sample_run = runs[runs["tags.stage"] == "sample"].iloc[0]
    assert sample_run["tags.mlflow.parentRunId"] == train_run["run_id"] == sample_run["tags.train_run_id"]
    assert sample_run["params.out"] == f"runs/{DATASET}/{MODEL}/samples"
    assert sample_run["metrics.n_images"] == 4
    assert {"samples_grid.png", "samples_meta.json"} <= {
        a.path for a in client.list_artifacts(sample_run["run_id"])
    }


@pytest.mark.slow
def test_four_parallel_train_processes_lose_no_run(tmp_path: Path) -> None:
    db = tmp_path / "shared" / "mlflow.db"
    db.parent.mkdir()
    procs = []
    for i in range(4):
        project = _project(tmp_path / f"p{i}")
        args = [
            "train",
            "--dataset",
            DATASET,
            "--model",
            MODEL,
            *_sets("train.steps=3", "train.log_every=1", f"tracking.uri=sqlite:///{db}"),
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "vmddpm", *args],
                cwd=project,
                env={**os.environ, **ONE_THREAD_ENV},
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errs
    runs = _runs(db)
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    assert all(len(_metric_steps(db, r, "loss")) == 3 for r in runs["run_id"])


def _metric_steps(db: Path, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, key)]


def test_disabled_tracking_is_a_noop(make_cfg) -> None:
    cfg = make_cfg("tracking.enabled=false")
    with start_run(cfg, "train", dataset=DATASET, model=MODEL) as run:
        assert isinstance(run, NullRun) and run.run_id is None
        run.log_params({"a": 1})
        run.log_metrics({"loss": 1.0}, step=1)
    assert not (cfg.root / "mlflow.db").exists()


def test_failed_stage_marks_run_failed(make_cfg) -> None:
    cfg = make_cfg("tracking.enabled=true")
    with pytest.raises(ZeroDivisionError), start_run(cfg, "evaluate", dataset=DATASET, model=MODEL) as run:
        run.log_metrics({"x": 1.0})
        1 / 0  # noqa: B018
    runs = _runs(cfg.root / "mlflow.db")
    assert list(runs["status"]) == ["FAILED"] and list(runs["tags.stage"]) == ["evaluate"]


def test_uri_is_resolved_against_root(make_cfg) -> None:
    cfg = make_cfg()
    assert resolve_uri(cfg) == f"sqlite:///{(cfg.root / 'mlflow.db').resolve()}"
    absolute = make_cfg("tracking.uri=sqlite:////tmp/x/m.db")
    assert resolve_uri(absolute) == "sqlite:////tmp/x/m.db"


def test_retry_backs_off_on_lock_only() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry(flaky, retries=4, base_delay=0.001) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        retry(lambda: (_ for _ in ()).throw(ValueError("bad uri")), retries=4, base_delay=0.001)
