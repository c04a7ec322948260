"""`make showcase` on a fresh clone, timed, and the showcase's acceptance figures from its own outputs
(issue 19).

Method: `git clone` this repository's HEAD commit (committed files only) into a scratch folder, link this
checkout's `.venv` into it (the install is excluded from the timing: `make` finds its stamp and does not
run pip; `PYTHONPATH` points at the clone, so the clone's code runs, not this checkout's editable
install, which is checked before timing), then time `make showcase SHOWCASE_CORES=N` (wall clock, and
the CPU time of every process it started). From the clone's own outputs, per model:

- `fid_ratio`: final / step-0 FID of the evaluations during training (`train/eval_history.csv`: the
  same fixed-seed samples, random-inception extractor, same run); target <= 0.3;
- `background`: the share of near-black pixels (uint8 < 25.5, 10 % of the range) in the final samples
  (the sample stage's) against the real prepared training images; target within 10 points;
- `eval_points` (target >= 5) and whether the curve falls (last < first, Spearman rho < 0);
- the evaluate stage's FID of the final samples (metrics.json), for reference.

Machine facts: cores (os.cpu_count, affinity), load average before and after, CPU model, commit.
Writes `results/benchmarks/showcase.json` atomically. Run from the repository root (about 45 min on 2
cores): `.venv/bin/python benchmarks/bench_showcase.py [--cores 2] [--keep]` or `make bench-showcase`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_workflow import tool_env  # noqa: E402
from vmddpm.io import write_json  # noqa: E402

log = logging.getLogger("bench_showcase")
NEAR_BLACK = 25.5  # 10 % of the uint8 range
DEFAULT_OUT = ROOT / "results" / "benchmarks" / "showcase.json"
TARGETS = {"wall_s": 3600.0, "fid_ratio": 0.3, "background_points": 0.10, "eval_points": 5}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def children_cpu() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime}


def gray_pngs(files: list[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("L")) for f in files])


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 1 else float("nan")


def rule_seconds(repo: Path) -> dict[str, dict[str, float]]:
    """Per rule: jobs, wall seconds (sum, max) and CPU seconds (sum) from the rules' benchmark files."""
    out: dict[str, dict[str, float]] = {}
    base = repo / "logs" / "showcase" / "benchmarks"
    for tsv in base.rglob("*.tsv"):
        rule = tsv.relative_to(base).parts[0].removesuffix(".tsv")
        with tsv.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                r = out.setdefault(
                    rule, {"jobs": 0, "seconds_sum": 0.0, "seconds_max": 0.0, "cpu_s_sum": 0.0}
                )
                r["jobs"] += 1
                r["seconds_sum"] = round(r["seconds_sum"] + float(row["s"]), 2)
                r["seconds_max"] = round(max(r["seconds_max"], float(row["s"])), 2)
                with contextlib.suppress(ValueError):
                    r["cpu_s_sum"] = round(r["cpu_s_sum"] + float(row.get("cpu_time") or 0), 2)
    return out


def acceptance(repo: Path) -> dict[str, Any]:
    """The acceptance figures of every model of the clone's showcase run, from its own files."""
    from vmddpm.config import load_config
    from vmddpm.contracts import EVAL_HISTORY, read_record, split_files

    cfg = load_config(repo / "params.yaml", scale="showcase")
    out: dict[str, Any] = {}
    for ds in cfg.datasets:
        real = gray_pngs(split_files(cfg.prepared_dir(ds), "train"))
        real_bg = float((real < NEAR_BLACK).mean())
        for model in cfg.models:
            rec: dict[str, Any] = {"dataset": ds, "model": model, "real_background": round(real_bg, 4)}
            hist = cfg.train_dir(ds, model) / EVAL_HISTORY
            rows = list(csv.DictReader(hist.open())) if hist.is_file() else []
            steps = [int(r["step"]) for r in rows]
            fids = [float(r["fid"]) for r in rows]
            rec.update(eval_points=len(rows), eval_steps=steps, eval_fid=[round(f, 5) for f in fids])
            if fids:
                rho = spearman(steps, fids)
                rec.update(
                    fid_step0=fids[0],
                    fid_final=fids[-1],
                    fid_ratio=round(fids[-1] / fids[0], 4) if fids[0] else None,
                    spearman_step_fid=round(rho, 3),
                    falls=bool(fids[-1] < fids[0] and rho < 0),
                )
            samples = sorted(cfg.samples_dir(ds, model).glob("*.png"))
            if samples:
                bg = float((gray_pngs(samples) < NEAR_BLACK).mean())
                rec.update(
                    final_samples=len(samples),
                    sample_background=round(bg, 4),
                    background_gap_points=round(abs(bg - real_bg), 4),
                )
            metrics = cfg.metrics_path(ds, model)
            if metrics.is_file():
                m = read_record(metrics)
                rec["evaluate_fid_final_samples"] = m.get("fid")
            rec["meets"] = {
                "fid_ratio": rec.get("fid_ratio") is not None and rec["fid_ratio"] <= TARGETS["fid_ratio"],
                "background": rec.get("background_gap_points", 1.0) <= TARGETS["background_points"],
                "eval_points": len(rows) >= TARGETS["eval_points"],
                "falls": bool(rec.get("falls")),
            }
            out[f"{ds}/{model}"] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", default="2", help="make showcase SHOWCASE_CORES=N (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch clone (its path is logged)")
    ap.add_argument(
        "--configfile",
        type=Path,
        help="smoke test of this script: a partial params.yaml for the clone's snakemake (e.g. a few "
        "steps); the JSON then goes to --out only if given",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    venv = ROOT / ".venv"
    if not any(venv.glob(".installed-*")):
        raise SystemExit(f"{venv}: no installed environment; run `make install` first (not timed)")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    )
    if dirty:
        log.warning(
            "working tree has uncommitted changes: the clone runs HEAD (%s) without them", commit[:12]
        )

    scratch = Path(tempfile.mkdtemp(prefix="vmddpm-bench-showcase-"))
    repo = scratch / "repo"
    try:
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(repo)], check=True)
        (repo / ".venv").symlink_to(venv)
        env = {**tool_env(), "PYTHONPATH": str(repo)}
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import vmddpm; print(vmddpm.__file__)"],
            cwd=repo, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not Path(where).resolve().is_relative_to(repo.resolve()):
            raise SystemExit(f"the clone would run {where}, not its own code; check PYTHONPATH")
        stamp = subprocess.run(
            ["make", "-n", "install"], cwd=repo, env=env, capture_output=True, text=True
        ).stdout
        if "pip install" in stamp:
            raise SystemExit(f"`make install` would run pip in the clone (stamp mismatch):\n{stamp}")

        smoke = []
        if args.configfile:
            shutil.copy(args.configfile, repo / "smoke.yaml")
            smoke = ["SHOWCASE_ARGS=--configfile smoke.yaml"]
        load_before = os.getloadavg()
        cpu0 = children_cpu()
        log.info(
            "make showcase SHOWCASE_CORES=%s in %s (load %.2f %.2f %.2f)", args.cores, repo, *load_before
        )
        t0 = time.perf_counter()
        with (scratch / "showcase.log").open("w") as fh:
            rc = subprocess.run(
                ["make", "showcase", f"SHOWCASE_CORES={args.cores}", *smoke],
                cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT,
            ).returncode  # fmt: skip
        wall = time.perf_counter() - t0
        cpu1 = children_cpu()
        load_after = os.getloadavg()
        if rc != 0:
            raise SystemExit(
                f"make showcase failed (exit {rc}) after {wall:.0f} s; see {scratch / 'showcase.log'}"
            )
        log.info("make showcase: %.1f min wall", wall / 60)
        models = acceptance(repo)
        doc = {
            "what": "make showcase on a fresh clone (install excluded) and its acceptance figures (issue 19)",
            "command": " ".join(["make showcase", f"SHOWCASE_CORES={args.cores}", *smoke]),
            "commit": commit,
            "wall_s": round(wall, 1),
            "wall_min": round(wall / 60, 2),
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 1) for k in cpu0},
            "rules": rule_seconds(repo),
            "models": models,
            "targets": TARGETS,
            "meets": {
                "wall": wall <= TARGETS["wall_s"],
                **{
                    k: all(m["meets"][k] for m in models.values())
                    for k in ("fid_ratio", "background", "eval_points", "falls")
                },
            },
            "machine": {
                "cpu_count": os.cpu_count(),
                "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "cpu_model": cpu_model(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in load_after],
            },
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if args.configfile and args.out == DEFAULT_OUT:
            print(json.dumps(doc, indent=1))
        else:
            write_json(args.out, doc)
            log.info("wrote %s", args.out)
        log.info("meets: %s", doc["meets"])
        for name, m in models.items():
            log.info(
                "%s: FID %s -> %s (ratio %s), %d points, background %s vs real %s",
                name, m.get("fid_step0"), m.get("fid_final"), m.get("fid_ratio"), m["eval_points"],
                m.get("sample_background"), m["real_background"],
            )  # fmt: skip
    finally:
        if args.keep:
            log.info("kept %s", scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
