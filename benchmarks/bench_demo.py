"""Wall-clock of the full demo DAG from fresh, and of a no-op rerun (issue 8, item 6).

Method: copy the repository (tracked + untracked-not-ignored files, exactly what a clone of the
working tree holds; params.yaml as it is, so the whole demo matrix: every dataset x every model) into
a scratch folder, `git init` it, then time `snakemake --cores N` (the `make demo` command) from
nothing, and then a second `snakemake --cores N` that must find nothing to do. Targets: <= 15 min and
<= 10 s on 2 cores. The per-rule wall times come from the rules' `benchmark:` files.

Writes `results/benchmarks/demo.json` atomically. Run from the repository root:
`.venv/bin/python benchmarks/bench_demo.py [--cores 2] [--keep]`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_workflow import make_fresh_repo, tool_env  # noqa: E402
from vmddpm.io import write_json  # noqa: E402

log = logging.getLogger("bench_demo")


def timed(cmd: list[str], cwd: Path, log_path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=tool_env()).returncode
    return time.perf_counter() - t0, rc


def rule_seconds(repo: Path) -> dict[str, dict[str, float]]:
    """Sum and count of the `s` column of every rule's benchmark TSV, per rule."""
    acc: dict[str, list[float]] = defaultdict(list)
    for tsv in (repo / "logs" / "benchmarks").rglob("*.tsv"):
        rule = tsv.relative_to(repo / "logs" / "benchmarks").parts[0].removesuffix(".tsv")
        with tsv.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                acc[rule].append(float(row["s"]))
    return {
        r: {"jobs": len(v), "seconds_sum": round(sum(v), 2), "seconds_max": round(max(v), 2)}
        for r, v in acc.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", default="2", help="snakemake --cores (default 2; 'all' = make demo)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is logged)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "demo.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    scratch = Path(tempfile.mkdtemp(prefix="vmddpm-bench-demo-"))
    try:
        repo = make_fresh_repo(scratch / "repo", test_config=False)
        snakemake = [str(Path(sys.executable).parent / "snakemake"), "--cores", str(args.cores)]
        log.info("full demo DAG in %s (snakemake --cores %s)", repo, args.cores)
        full_s, rc = timed(snakemake, repo, scratch / "full.log")
        if rc != 0:
            raise SystemExit(f"demo run failed (exit {rc}); see {scratch / 'full.log'}")
        log.info("full DAG: %.1f s; no-op rerun ...", full_s)
        noop_s, rc = timed(snakemake, repo, scratch / "noop.log")
        nothing = "Nothing to be done" in (scratch / "noop.log").read_text()
        if rc != 0 or not nothing:
            raise SystemExit(f"no-op rerun did work or failed (exit {rc}); see {scratch / 'noop.log'}")
        import yaml

        params = yaml.safe_load((repo / "params.yaml").read_text())
        result = {
            "benchmark": "full demo DAG from fresh + no-op rerun (snakemake)",
            "command": " ".join(["snakemake", "--cores", str(args.cores)]),
            "cores": args.cores,
            "cpu_count": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "cpu": platform.machine(),
            "python": platform.python_version(),
            "datasets": params["datasets"],
            "models": params["models"],
            "full_dag_seconds": round(full_s, 1),
            "noop_rerun_seconds": round(noop_s, 2),
            "targets": {"full_dag_seconds": 900, "noop_rerun_seconds": 10},
            "per_rule": rule_seconds(repo),
        }
        write_json(args.out, result)
        log.info("wrote %s: full %.1f s, no-op %.2f s", args.out, full_s, noop_s)
    finally:
        if args.keep:
            log.info("kept %s", scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
