"""The showcase scale and evaluation during training (`train.eval_every`): the config narrows the matrix
and keeps its outputs apart, a tiny run writes its eval history and an MLflow series without changing
the weights, a killed and resumed run keeps the history exact, the report draws from it, and Snakemake
schedules only the showcase's jobs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import TINY, kill_and_resume
from tests.test_train import DATASET, MODEL, write_prepared
from vmddpm.contracts import EVAL_GRIDS, EVAL_HISTORY, EVAL_HISTORY_FIELDS
from vmddpm.io import read_png_grid, write_png_grid

ROOT = Path(__file__).resolve().parents[1]
EVAL = ("train.eval_every=2", "train.eval_images=8", "train.eval_steps=2")
pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _weights(path: Path) -> tuple[str, str]:
    import torch

    from vmddpm.runtime import state_hash

    state = torch.load(path, weights_only=True)
    return state_hash(state["model"]), state_hash(state["ema"])


# ------------------------------------------------------------------------------------------- config
def test_showcase_scale_narrows_the_matrix_and_keeps_its_outputs_apart(make_cfg, cli, tmp_path) -> None:
    show, demo = make_cfg(scale="showcase"), make_cfg()
    assert show.scale == "showcase"
    assert show.datasets == ["brats2018"] and show.models == ["vmddpm", "unet_attn"]
    assert show.data.brats2018.source == "phantom" and show.data.image_size == 32
    assert show.diffusion.prediction_type == "v_prediction" and demo.diffusion.prediction_type == "epsilon"
    assert show.train.eval_every > 0 and show.train.steps // show.train.eval_every >= 5
    assert show.eval.extractor == "random-inception" and show.eval.ddim_steps_sweep == []
    assert show.model.base_channels == demo.model.base_channels  # the demo's widths
    for where in ("prepared_dir", "run_dir"):
        a = getattr(show, where)("brats2018", *(["vmddpm"] if where == "run_dir" else []))
        b = getattr(demo, where)("brats2018", *(["vmddpm"] if where == "run_dir" else []))
        assert a != b
    assert show.results_dir() != demo.results_dir()
    shown = yaml.safe_load(cli("--scale", "showcase", "config", "show", cwd=tmp_path).stdout)
    assert shown["models"] == ["vmddpm", "unet_attn"] and shown["scale"] == "showcase"
    bad = cli("--scale", "show", "config", "show", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "showcase" in bad.stderr


# --------------------------------------------------------------------------------- eval in training
def test_eval_during_training_writes_history_and_mlflow_series(make_cfg) -> None:
    """Steps 0, 2, 4 (start, every eval_every, end) in eval_history.csv, eval/ grids, the MLflow run's
    `eval_fid` series and the checkpoint; the weights are those of a run without it, the run key is not."""
    from mlflow.tracking import MlflowClient

    from vmddpm.stages.train import train
    from vmddpm.trainkit import load_checkpoint

    steps = ("train.steps=4", "train.checkpoint_every=2", "train.deterministic=true")
    cfg = make_cfg(*TINY, *steps, *EVAL, "tracking.enabled=true")
    write_prepared(cfg.prepared_dir(DATASET), size=cfg.data.image_size)
    out = train(cfg, DATASET, MODEL)
    rows = _rows(out / EVAL_HISTORY)
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert tuple(rows[0]) == EVAL_HISTORY_FIELDS
    assert all(float(r["fid"]) > 0 and int(r["n_images"]) == 8 for r in rows)
    grids = sorted(p.name for p in (out / EVAL_GRIDS).iterdir())
    assert grids == [f"step_{s:08d}.png" for s in (0, 2, 4)]
    assert read_png_grid(out / EVAL_GRIDS / grids[-1], cfg.data.image_size, 8).shape == (8, 16, 16)
    last = load_checkpoint(out / "last.pt")
    assert [int(r["step"]) for r in last["eval_history"]] == [0, 2, 4]

    client = MlflowClient(f"sqlite:///{cfg.root / 'mlflow.db'}")
    run_id = (out / "mlflow_run.json").read_text().split('"run_id": "')[1].split('"')[0]
    series = client.get_metric_history(run_id, "eval_fid")
    assert sorted(m.step for m in series) == [0, 2, 4]
    assert {m.step: m.value for m in series}[4] == pytest.approx(float(rows[-1]["fid"]))

    plain = make_cfg(*TINY, *steps, "paths.runs=runs_plain", "train.eval_every=0")  # no eval, no tracking
    out_plain = train(plain, DATASET, MODEL)
    assert not (out_plain / EVAL_HISTORY).exists()
    assert _weights(out_plain / "model.pt") == _weights(out / "model.pt")
    # ... but not its run key: the eval knobs are part of it, so a finished run whose eval settings change
    # trains again from step 0 (its history needs the weights of every step it scores), never a run that
    # resumes at its end with an empty history
    key = load_checkpoint(out / "model.pt")["run_key"]
    assert load_checkpoint(out_plain / "model.pt")["run_key"] != key


def test_killed_and_resumed_run_keeps_the_eval_history(tmp_path: Path) -> None:
    """SIGKILL after the first step checkpoint, the train folder deleted (as Snakemake does), rerun: the
    eval history and its grids equal an uninterrupted run's, no point lost or repeated."""
    args = ["train", "--dataset", DATASET, "--model", MODEL]
    for item in (*TINY, "train.steps=8", "train.checkpoint_every=2", "train.deterministic=true", *EVAL):
        args += ["--set", item]
    straight, killed = kill_and_resume(
        tmp_path,
        args,
        lambda root: write_prepared(root / "data" / "prepared" / DATASET),
        f"runs/{DATASET}/{MODEL}/train",
        max_step=8,
        remove_output=True,  # what Snakemake does to a failed job's output
    )
    a, b = _rows(straight / EVAL_HISTORY), _rows(killed / EVAL_HISTORY)
    assert [int(r["step"]) for r in b] == [0, 2, 4, 6, 8]
    assert a == b
    names = sorted(p.name for p in (straight / EVAL_GRIDS).iterdir())
    assert names == sorted(p.name for p in (killed / EVAL_GRIDS).iterdir())
    for name in names:
        assert (straight / EVAL_GRIDS / name).read_bytes() == (killed / EVAL_GRIDS / name).read_bytes()
    assert _weights(killed / "model.pt") == _weights(straight / "model.pt")


# ------------------------------------------------------------------------------------------- report
def _fake_run(cfg, model: str, fids: list[float]) -> None:
    """A train folder's eval history and grids, as the train stage writes them."""
    from vmddpm.trainkit import write_history

    out = cfg.train_dir("brats2018", model)
    size = cfg.data.image_size
    rows = []
    for i, fid in enumerate(fids):
        step = i * cfg.train.eval_every
        rng = np.random.default_rng(i)
        write_png_grid(out / EVAL_GRIDS / f"step_{step:08d}.png", rng.integers(0, 255, (16, size, size)))
        rows.append(
            {"step": step, "fid": fid, "kid_mean": fid / 100, "kid_std": 0.0, "n_images": 64,
             "sampler_steps": 10, "grid_images": 16}
        )  # fmt: skip
    write_history(out / EVAL_HISTORY, rows, EVAL_HISTORY_FIELDS)


def test_report_draws_fid_against_step_from_eval_history(make_cfg) -> None:
    from vmddpm.report import inputs
    from vmddpm.stages.report import report

    cfg = make_cfg(scale="showcase")
    write_prepared(cfg.prepared_dir("brats2018"), size=cfg.data.image_size)
    for rel in ("paper/reference.csv", "benchmarks/scaling.json"):
        cfg.results_dir(rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "results" / rel, cfg.results_dir(rel))
    fids = [40.0, 20.0, 9.0, 5.0, 3.0, 2.5, 2.0]
    _fake_run(cfg, "vmddpm", fids)
    _fake_run(cfg, "unet_attn", [f * 1.1 for f in fids])
    evals = inputs.eval_histories(cfg)
    assert {k: len(v) for k, v in evals.items()} == {
        ("brats2018", "vmddpm"): 7,
        ("brats2018", "unet_attn"): 7,
    }
    assert [r["fid"] for r in evals[("brats2018", "vmddpm")]] == fids
    tile = inputs.eval_grid(cfg, "brats2018", "vmddpm", 0, 8)
    assert tile is not None and tile.shape == (8, 32, 32)
    report(cfg)
    figs = cfg.results_dir("figures")
    for name in ("fid_vs_train_step.png", "showcase_samples.png", "showcase_fid.png"):
        assert (figs / name).stat().st_size > 10_000, name

    demo = make_cfg()  # another scale: no showcase figures, no eval history to draw
    assert inputs.eval_histories(demo) == {}


def test_png_grid_round_trip(tmp_path: Path) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (7, 12, 12)).astype(np.uint8)
    path = write_png_grid(tmp_path / "g.png", imgs)
    assert np.array_equal(read_png_grid(path, 12, 7), imgs)
    assert len(read_png_grid(path, 12, 20)) == 9  # 3 x 3 cells, two of them blank


# ---------------------------------------------------------------------------------------- workflow
def test_snakemake_schedules_only_the_showcase_jobs(tmp_path: Path) -> None:
    from tests.test_workflow import dry_run_jobs, make_fresh_repo, snakemake

    repo = make_fresh_repo(tmp_path / "repo", test_config=False)
    jobs = dry_run_jobs(repo, "--config", "scale=showcase")
    assert jobs == {
        "download": 1, "prepare": 1, "train": 2, "sample": 2, "sweep": 2, "evaluate": 2, "report": 1,
        "committed_input": 2, "dvc_commit": 1, "all": 1,
    }  # fmt: skip
    proc = snakemake(repo, "--dry-run", "--printshellcmds", "--config", "scale=showcase")
    text = proc.stdout
    assert "--scale showcase train --dataset brats2018 --model vmddpm " in text
    assert "--scale showcase train --dataset brats2018 --model unet_attn " in text
    assert "--dataset acdc" not in text and "--dataset chestxray" not in text
    assert "showcase/runs/brats2018/vmddpm/train" in text and "logs/showcase/train/" in text
