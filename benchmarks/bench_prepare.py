"""Prepare throughput (slices/s) of each dataset's phantoms at 128x128.

Method: in a scratch folder, generate each dataset's phantom archive and run the real `download`
(file:// fetch, verify, extract) once; then time `prepare_dataset` alone (decode, normalise, crop,
resize, PNG encode, manifest, atomic rename) `--repeats` times, deleting the prepared folder between
runs, and report the median wall time and slices/s. Phantom volumes are `--phantom-size` pixels
in-plane (default 192, so 128x128 is a downsampling as with the real data) and `--depth` slices deep.
Single process, so the figure is per CPU core.

Writes `results/benchmarks/prepare.json` atomically. Run from the repository root:
`.venv/bin/python benchmarks/bench_prepare.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_prepare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--phantom-size", type=int, default=192)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="default: <paths.results>/benchmarks/prepare.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from vmddpm.config import DATASETS, load_config
    from vmddpm.data.download import download_dataset
    from vmddpm.data.prepare import prepare_dataset
    from vmddpm.io import write_json

    base = load_config(args.params)
    out = args.out or base.results_dir("benchmarks", "prepare.json")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare.") as scratch:
        params = Path(scratch) / "params.yaml"
        shutil.copy(args.params, params)
        overrides = [
            f"data.image_size={args.image_size}",
            f"data.phantoms.size={args.phantom_size}",
            f"data.phantoms.depth={args.depth}",
            *(f"data.{d}.source=phantom" for d in DATASETS),
        ]
        cfg = load_config(params, overrides=overrides)
        for ds in DATASETS:
            download_dataset(cfg, ds)
            times, n = [], 0
            for _ in range(args.repeats):
                shutil.rmtree(cfg.prepared_dir(ds), ignore_errors=True)
                t0 = time.perf_counter()
                folder = prepare_dataset(cfg, ds)
                times.append(time.perf_counter() - t0)
                n = sum(1 for _ in (folder / "manifest.csv").open()) - 1
            med = statistics.median(times)
            results[ds] = {
                "slices": n,
                "seconds_median": round(med, 4),
                "seconds_all": [round(t, 4) for t in times],
                "slices_per_s": round(n / med, 1),
                "subjects": getattr(cfg.data.phantoms, f"{ds}_subjects"),
            }
            log.info("%s: %d slices in %.3fs -> %.1f slices/s", ds, n, med, n / med)
    doc = {
        "benchmark": "prepare throughput on phantoms",
        "image_size": args.image_size,
        "phantom_size": args.phantom_size,
        "depth": args.depth,
        "repeats": args.repeats,
        "processes": 1,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "results": results,
    }
    write_json(out, doc)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
