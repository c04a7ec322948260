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

ROOT = Path(__file__).resolve().parents[1]

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
    # DVC's last stage told Snakemake what ran: a DVC-only run leaves Snakemake nothing to do either
    assert wf.dry_run_jobs(repo) == {}


def test_report_renders_each_table_with_its_caption_in_a_browser(done: Path, tmp_path: Path) -> None:
    """Acceptance 2: `snakemake --report report.html` opened in headless Chromium; the main table's entry
    (Tables) shows the HTML table itself, read from the DOM: one captioned table per dataset."""
    from tests.test_readerstudy import CHROMEDRIVER, CHROMIUM

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            f"{CHROMIUM} or {CHROMEDRIVER} missing: `make browser` installs chromium + chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wf.snakemake(done, "--report", "report.html")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(60)
        wait = WebDriverWait(driver, 30)
        driver.get((done / "report.html").as_uri())
        wait.until(lambda d: d.find_elements(By.XPATH, "//a[normalize-space()='Tables']"))
        assert "VM-DDPM reproduction" in driver.page_source  # the workflow description
        entries = driver.execute_script("return Object.values(results).map(r => [r.name, r.caption]);")
        captions = {name: caption for name, caption in entries}
        tables = ("main.html", "ablation.html", "main.csv", "ablation.csv", "summary.json")
        assert all(captions.get(t) for t in tables), sorted(captions)
        assert len({captions[t] for t in tables}) == len(tables)  # each table its own caption
        assert "Main results" in captions["main.html"] and "Ablations" in captions["ablation.html"]
        driver.find_element(By.XPATH, "//a[normalize-space()='Tables']").click()
        row = wait.until(lambda d: d.find_element(By.XPATH, "//tr[td[normalize-space()='main results']]"))
        row.find_element(By.CSS_SELECTOR, "a[iconname='eye']").click()
        frame = wait.until(lambda d: d.find_element(By.TAG_NAME, "iframe"))
        driver.switch_to.frame(frame)
        tables = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.vmddpm"))
        datasets, models = matrix(done)
        inner = [t.find_element(By.TAG_NAME, "caption").text for t in tables]
        assert [c.split(":")[0] for c in inner] == datasets, inner
        header = [th.text for th in tables[0].find_elements(By.CSS_SELECTOR, "thead th")]
        assert header[:3] == ["rank", "model", "FID (ours)"]
        body = [
            [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in tables[0].find_elements(By.CSS_SELECTOR, "tbody tr")
        ]
        assert sorted(r[1] for r in body) == sorted(models) and all(float(r[2]) > 0 for r in body)
        assert all(r[3] == "" for r in body)  # demo rows: no paper FID
    finally:
        driver.quit()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_rest_api_links_evaluations_to_their_training(done: Path) -> None:
    """Acceptance 2: `mlflow server` on the pipeline's store; over its REST API every evaluate run
    carries dataset, model and the model's knobs (`model.sr`) and the id of the train run it scored,
    each train run a logged (and registered) model, and artifacts come from the relative location."""
    import json as _json
    import subprocess
    import time
    import urllib.request

    port = _free_port()
    server = subprocess.Popen(
        [str(wf.BIN / "mlflow"), "server", "--backend-store-uri", "sqlite:///mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=done, env=wf.tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else _json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return _json.loads(r.read())

    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        exp = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=vmddpm")["experiment"]
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs
        assert exp["artifact_location"] == "mlflow-artifacts:/vmddpm"
        runs = call(
            "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
        )["runs"]

        def view(run: dict) -> tuple[dict, dict]:
            data = run["data"]
            return {t["key"]: t["value"] for t in data.get("tags", [])}, {
                p["key"]: p["value"] for p in data.get("params", [])
            }

        train = {}
        for r in runs:
            t, _ = view(r)
            if t.get("stage") == "train":
                train.setdefault((t["dataset"], t["model"]), set()).add(r["info"]["run_id"])
        names = [view(r)[0]["mlflow.runName"] for r in runs]
        assert len(set(names)) == len(names)
        evaluations = [(*view(r), r) for r in runs if view(r)[0].get("stage") == "evaluate"]
        datasets, models = matrix(done)
        assert {(t["dataset"], t["model"]) for t, _, _ in evaluations} == {
            (d, m) for d in datasets for m in models
        }
        srs = {}
        for t, p, r in evaluations:
            assert p["dataset"] == t["dataset"] and p["model"] == t["model"]
            assert t["train_run_id"] in train[(t["dataset"], t["model"])]
            assert t["mlflow.parentRunId"] == t["train_run_id"] and t["git_dirty"] in ("true", "false")
            srs[t["model"]] = p["model.sr"]
            metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
            served = call(f"/get-artifact?path=metrics.json&run_uuid={r['info']['run_id']}")
            assert served["fid"] == pytest.approx(metrics["fid"])  # from mlartifacts/, relative
        assert srs["vmddpm"] in ("window", "zigzag") and srs["vmddpm_csm"] == "none"
        logged = call("/api/2.0/mlflow/logged-models/search", {"experiment_ids": [exp["experiment_id"]]})[
            "models"
        ]
        sources = {m["info"]["source_run_id"] for m in logged if m["info"]["name"] == "ema"}
        assert all(ids & sources for ids in train.values())
        registered = {
            m["name"]
            for m in call("/api/2.0/mlflow/registered-models/search?max_results=1000")["registered_models"]
        }
        assert {f"vmddpm-{d}-{m}" for d in datasets for m in models} <= registered
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_dvc_experiment_reruns_only_what_reads_the_knob_and_snakemake_agrees(done: Path) -> None:
    """Acceptance 1: after the finished pipeline, `dvc exp run -S model.sr=zigzag` retrains only the
    presets that read `model.sr` (vmddpm, not vmddpm_csm: it sets its own), `snakemake -n` then
    schedules nothing, `dvc status` is clean, and params.yaml differs from HEAD by one line."""
    import re

    if wf.run("git", "status", "--porcelain", cwd=done).stdout.strip():
        wf.run("git", "add", "-A", cwd=done)
        wf.run("git", "commit", "-q", "-m", "pipeline run", cwd=done)
    assert wf.dry_run_jobs(done) == {}
    proc = wf.run("dvc", "exp", "run", "-S", "model.sr=zigzag", cwd=done, timeout=1500)
    ran = set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))
    datasets, _ = matrix(done)
    trained = {s for s in ran if s.startswith("train")}
    assert trained == {f"train-vmddpm@{d}" for d in datasets}, ran
    assert not any("vmddpm_csm" in s for s in ran), ran
    assert not any(s.startswith(("download", "prepare")) for s in ran), ran
    assert {"report", "snakemake-sync"} <= ran
    assert wf.dry_run_jobs(done) == {}  # Snakemake agrees: nothing to do
    assert "up to date" in wf.run("dvc", "status", cwd=done).stdout.lower()
    diff = wf.run("git", "diff", "--unified=0", "params.yaml", cwd=done).stdout
    changed = [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    assert changed == [
        "-  sr: window # none | window | zigzag | random",
        "+  sr: zigzag # none | window | zigzag | random",
    ]
    # and back through Snakemake: the other way round, DVC agrees after a Snakemake run
    wf.run("git", "checkout", "params.yaml", cwd=done)
    jobs = wf.dry_run_jobs(done)
    assert jobs.get("train") == len(datasets) and "vmddpm_csm" not in str(jobs), jobs
