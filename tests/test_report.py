"""The report stage from a fixed set of metrics files, sample folders and benchmark JSON.

`build_fixture` writes a synthetic but complete project state (prepared PNGs + manifest, sample
folders, metrics.json with every protocol field, a DDIM sweep, a scaling benchmark); the tests run
the real `report` on it and check the tables row by row and that every figure is a readable PNG.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmddpm import contracts as C
from vmddpm.config import Config
from vmddpm.metrics import extractor as X
from vmddpm.report import inputs
from vmddpm.report import tables as T
from vmddpm.stages import report as stage

ROOT = Path(__file__).resolve().parents[1]
MISSING = {("acdc", "dit"), ("brats2018", "wgan_gp"), ("brats2018", "vmddpm_ssm_only")}
# chestxray is "evaluated" under the paper protocol (scale paper, real Inception): the one dataset
# whose rows may be compared with the paper; the others are demo rows.
PAPER_PROTOCOL = {"chestxray"}


def blobs(n: int, seed: int, size: int = 32, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, size, size))
    for i in range(n):
        for _ in range(3):
            cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
            out[i] += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    out = 255 * out / out.max(axis=(1, 2), keepdims=True) + rng.normal(0, noise, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def fake_fid(ds: str, model: str) -> float:
    """A fixed, distinct FID per run (vmddpm best on every dataset, vmddpm_csm second)."""
    order = [
        "vmddpm", "vmddpm_csm", "vmddpm_sr_zigzag", "vmddpm_sr_random", "vmddpm_single_level",
        "vmddpm_cnn_only", "vmddpm_ssm_only", "unet_attn", "dit", "wgan_gp", "dcgan",
    ]  # fmt: skip
    base = {"chestxray": 12.0, "brats2018": 15.0, "acdc": 36.0}[ds]
    return base + 3.0 * order.index(model) + 0.25


def build_fixture(cfg: Config) -> dict[tuple[str, str], dict]:
    """Write the synthetic project state under cfg's paths; returns the metrics written."""
    ref = cfg.results_dir("paper", "reference.csv")
    ref.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "results" / "paper" / "reference.csv", ref)
    written = {}
    for d, ds in enumerate(cfg.datasets):
        prepared = cfg.prepared_dir(ds)
        (prepared / "train").mkdir(parents=True, exist_ok=True)
        rows = ["file,subject,split,source,slice"]
        for i, im in enumerate(blobs(10, seed=100 + d)):
            Image.fromarray(im, mode="L").save(prepared / "train" / f"{i:05d}.png")
            rows.append(f"train/{i:05d}.png,s{i},train,synthetic,{i}")
        (prepared / "manifest.csv").write_text("\n".join(rows) + "\n")
        for k, model in enumerate(cfg.models):
            if (ds, model) in MISSING:
                continue
            folder = cfg.samples_dir(ds, model)
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(blobs(8, seed=1000 * d + k, noise=4.0 * k)):
                Image.fromarray(im, mode="L").save(folder / f"{i:06d}.png")
            paper = ds in PAPER_PROTOCOL
            m = {
                "dataset": ds,
                "model": model,
                "fid": fake_fid(ds, model),
                "kid_mean": 0.01 * (k + 1),
                "kid_std": 0.001,
                "fid_clean": fake_fid(ds, model) * 1.03,
                "fid_real_floor": 2.5,
                "n_real": 10,
                "n_fake": 8,
                "extractor": "inception" if paper else "random-inception",
                "weights_sha256": X.INCEPTION_SHA256 if paper else "ab" * 32,
                "resize": X.RESIZE.format(size=299),
                "sampler": "gan" if cfg.preset(model).family == "gan" else "ddim",
                "steps": None if cfg.preset(model).family == "gan" else 20,
                "seed": 0,
                "scale": "paper" if paper else "demo",
                "comparable_to_paper": paper,
                "label": "" if paper else C.DEMO_LABEL,
                "memorised_share": 0.125 if model == "dcgan" else 0.0,
                "memorised_count": 1 if model == "dcgan" else 0,
                "nn_distance_min": 0.01 if model == "dcgan" else 0.05,
                "nn_distance_median": 0.08,
                "memorisation_threshold": 0.02,
                "checkpoint_step": 150,
            }
            cfg.metrics_path(ds, model).write_text(json.dumps(m))
            written[(ds, model)] = m
        sweep = {
            "label": C.DEMO_LABEL,
            "rows": [{"steps": s, "fid": 60.0 / s**0.5 + 30 + d} for s in (5, 10, 20, 50)],
        }
        cfg.run_dir(ds, "vmddpm").joinpath("ddim_sweep.json").write_text(json.dumps(sweep))
    bench = cfg.results_dir("benchmarks", "scaling.json")
    bench.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "mixer": mixer,
            "size": sz,
            "pixels": sz * sz,
            "step_s_median": (2e-5 * sz * sz if mixer == "csm" else 2e-8 * (sz * sz) ** 2) + 0.01,
            "peak_mem_mb": 0.01 * sz * sz if mixer == "csm" else 1e-5 * (sz * sz) ** 2,
        }
        for mixer in ("csm", "attention")
        for sz in (16, 32, 64, 128)
    ]
    records.append({"mixer": "attention", "size": 256, "error": "timed out after 600s"})  # a failed point
    bench.write_text(json.dumps({"device": "cpu", "points": records, "growth": {}}))
    return written


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def state(make_cfg):
    cfg = make_cfg("tracking.enabled=false")
    return cfg, build_fixture(cfg)


def test_reference_csv_holds_only_the_known_numbers():
    rows = read_csv(ROOT / "results" / "paper" / "reference.csv")
    known = {(r["dataset"], r["model"]): r["value"] for r in rows if r["value"]}
    assert known == {
        ("chestxray", "vmddpm"): "11.783",
        ("brats2018", "vmddpm"): "12.513",
        ("acdc", "vmddpm"): "34.525",
    }
    assert all(r["source"] == "arXiv:2405.05667" for r in rows)
    assert all(r["value"] == "" for r in rows if r["model"] != "vmddpm")  # unknown cells stay empty


def test_report_tables_from_a_fixed_set_of_metrics(state, caplog):
    cfg, written = state
    ref = cfg.results_dir("paper", "reference.csv")
    before = hashlib.sha256(ref.read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING, logger="vmddpm.report"):
        tables = stage.report(cfg)
    assert hashlib.sha256(ref.read_bytes()).hexdigest() == before  # never overwritten
    # the missing runs are named in a warning and in the table
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"{ds}/{m}" in warned for ds, m in MISSING)

    rows = read_csv(tables / "main.csv")
    assert len(rows) == len(cfg.datasets) * len(cfg.models)
    assert set(rows[0]) == set(T.MAIN_COLUMNS)
    for ds in cfg.datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        done = [r for r in mine if r["label"] != T.NOT_RUN]
        expected = sorted((m for (d, m) in written if d == ds), key=lambda m: fake_fid(ds, m))
        assert [r["model"] for r in done] == expected  # ranked by FID
        assert [int(r["rank"]) for r in done] == list(range(1, len(expected) + 1))
        assert {r["model"] for r in mine if r["label"] == T.NOT_RUN} == {m for d, m in MISSING if d == ds}
        assert mine[: len(done)] == done  # not-run rows last
    by = {(r["dataset"], r["model"]): r for r in rows}
    # the comparable row: the paper's value beside ours, and the difference
    cx = by[("chestxray", "vmddpm")]
    assert cx["label"] == "" and cx["comparable_to_paper"] == "True"
    assert float(cx["fid_paper"]) == 11.783 and cx["paper_source"] == "arXiv:2405.05667"
    assert float(cx["fid_minus_paper"]) == pytest.approx(fake_fid("chestxray", "vmddpm") - 11.783)
    assert cx["extractor"] == "inception" and cx["weights_sha256"] == X.INCEPTION_SHA256
    # demo rows: labelled, never compared with the paper
    acdc = by[("acdc", "vmddpm")]
    assert (
        acdc["label"] == C.DEMO_LABEL
        and acdc["fid_minus_paper"] == ""
        and acdc["comparable_to_paper"] == "False"
    )
    assert acdc["fid_paper"] == "" and acdc["paper_source"] == ""  # no paper number in a demo row
    assert all(
        r["label"] == C.DEMO_LABEL for r in rows if r["dataset"] != "chestxray" and r["label"] != T.NOT_RUN
    )
    assert by[("chestxray", "unet_attn")]["fid_paper"] == ""  # unknown: empty, not invented
    # protocol columns come through
    assert by[("brats2018", "dcgan")]["sampler"] == "gan" and by[("brats2018", "vmddpm")]["steps"] == "20"

    md = (tables / "main.md").read_text()
    assert C.DEMO_LABEL.upper() in md and C.DEMO_LABEL in md and T.NOT_RUN in md
    assert "| 1 | vmddpm | 12.25 | 11.78 |" in md
    acdc_md = md.split("## acdc\n", 1)[1].split("\n## ", 1)[0]
    assert "34.52" not in acdc_md and "| 1 | vmddpm | 36.25 |  |  |" in acdc_md  # demo: no paper number
    assert "acdc vmddpm: FID 34.525 (arXiv:2405.05667)" in md  # listed apart, for reference
    assert "docs/paper.md" in md and "PAPER.md" not in md
    assert (ROOT / "docs" / "paper.md").is_file()
    # the HTML twin: one captioned table per dataset, the same cells
    page = (tables / "main.html").read_text()
    assert page.count("<table") == len(cfg.datasets) and page.count("<caption>") == len(cfg.datasets)
    assert "<caption>acdc: FID per model, ranked (lower is better) — demo" in page
    assert "<td>36.25</td>" in page
    abl_page = (tables / "ablation.html").read_text()
    assert abl_page.count("<caption>") == 1 and "vmddpm_csm" in abl_page

    abl = read_csv(tables / "ablation.csv")
    vm = [m for m in cfg.models if cfg.preset(m).family == "vmunet"]
    assert {r["model"] for r in abl} == set(vm) and len(abl) == len(vm) * len(cfg.datasets)
    csm = next(r for r in abl if r["dataset"] == "acdc" and r["model"] == "vmddpm_csm")
    assert csm["change"] == "sr=none" and float(csm["fid_minus_vmddpm"]) == pytest.approx(3.0)
    assert csm["label"] == C.DEMO_LABEL
    ssm = next(r for r in abl if r["dataset"] == "brats2018" and r["model"] == "vmddpm_ssm_only")
    assert ssm["label"] == T.NOT_RUN and ssm["fid"] == ""
    assert "vmddpm_csm | sr=none |" in (tables / "ablation.md").read_text()

    # summary.json (DVC metrics) holds numbers only; what they mean is in claims.json
    summary = json.loads((tables / "summary.json").read_text())

    def leaves(node):
        return [x for v in node.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves(summary))
    assert summary["fid"]["acdc"]["vmddpm"] == pytest.approx(fake_fid("acdc", "vmddpm"))
    assert summary["kid"]["acdc"]["vmddpm"] == pytest.approx(0.01)
    assert summary["n_runs"] == len(written)
    claims = json.loads((tables / "claims.json").read_text())
    assert claims["comparable_to_paper"] is False and claims["label"] == C.DEMO_LABEL
    assert sorted(claims["not_run"]) == sorted(f"{d}/{m}" for d, m in MISSING)
    assert claims["claims"]["C3"].startswith("chestxray: yes")


def test_report_figures_are_readable_pngs(state):
    cfg, _ = state
    stage.report(cfg)
    figs = cfg.results_dir("figures")
    names = ["fid_overview.png", "fid_vs_train_step.png", "fid_vs_ddim_steps.png", "scaling.png"]
    names += [f"samples_{ds}.png" for ds in cfg.datasets]
    for name in names:
        with Image.open(figs / name) as im:
            im.verify()
        with Image.open(figs / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 5  # not blank
    assert not list(figs.glob(".*"))  # no temp files left behind
    series = inputs.scaling_series(
        json.loads(cfg.results_dir("benchmarks", "scaling.json").read_text()), "step_s_median"
    )
    assert sorted(series) == ["attention", "csm"]  # by variant, else mixer
    assert len(series["attention"]) == 4  # the failed point is skipped


def test_report_with_nothing_evaluated_says_not_run(make_cfg, cli, tmp_path):
    cfg = make_cfg()
    ref = cfg.results_dir("paper", "reference.csv")
    ref.parent.mkdir(parents=True)
    shutil.copy(ROOT / "results" / "paper" / "reference.csv", ref)
    proc = cli("report", cwd=tmp_path)
    assert "no metrics for 33 of 33 runs" in proc.stderr
    rows = read_csv(cfg.results_dir("tables", "main.csv"))
    assert len(rows) == 33 and {r["label"] for r in rows} == {T.NOT_RUN}
    assert json.loads(cfg.results_dir("tables", "summary.json").read_text())["n_runs"] == 0
    for name in ("fid_vs_train_step.png", "fid_vs_ddim_steps.png", "samples_acdc.png"):
        assert cfg.results_dir("figures", name).is_file()
    # no scaling benchmark: no placeholder figure, a warning instead
    assert not cfg.results_dir("figures", "scaling.png").exists()
    assert "no usable scaling benchmark" in proc.stderr
    ref.unlink()
    proc = cli("report", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "reference.csv: the paper's reference numbers are missing" in proc.stderr


def test_fid_against_training_step_from_mlflow(make_cfg):
    """Evaluate runs logged at several checkpoint steps (a real sqlite MLflow store) make the curve."""
    from vmddpm.tracking import start_run

    cfg = make_cfg()
    for step, fid in ((50, 80.0), (100, 60.0), (150, 45.0)):
        with start_run(cfg, "evaluate", dataset="acdc", model="vmddpm") as run:
            run.log_metrics({"fid": fid}, step=step)
    with start_run(cfg, "train", dataset="acdc", model="vmddpm") as run:  # other stages are ignored
        run.log_metrics({"fid": 1.0}, step=7)
    hist = inputs.mlflow_fid_history(cfg)
    assert hist == {("acdc", "vmddpm"): [(50, 80.0), (100, 60.0), (150, 45.0)]}


def test_an_empty_clean_fid_column_says_why(make_cfg):
    """A run evaluated with `eval.clean_fid: false` shows "off" and a note naming the knob, never a
    silently empty cell."""
    cfg = make_cfg("tracking.enabled=false")
    m = {"fid": 3.0, "kid_mean": 0.1, "kid_std": 0.01, "clean_fid": False, "scale": "demo"}
    m |= {"extractor": "random-inception", "comparable_to_paper": False, "n_real": 16, "n_fake": 16}
    rows = T.main_rows(cfg, {("acdc", "vmddpm"): m}, {})
    md = T.main_markdown(rows, T.claims(cfg, {("acdc", "vmddpm"): m}, {}), {})
    acdc = md.split("## acdc\n", 1)[1]
    row = next(line for line in acdc.splitlines() if "| vmddpm |" in line)
    assert "| off |" in row
    assert "`eval.clean_fid` was false" in md and "scales.demo.eval.clean_fid=true" in md
