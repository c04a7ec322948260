"""Speed of the S6 selective-scan backends on CPU, side by side with mambapy's pscan.

Workload: the whole S6 core, forward + backward: u, delta (batch, dim, L), A (dim, N), B, C
(batch, N, L) -> y = selective_scan(u, delta, A, B, C); y.sum().backward() (gradients for all five
inputs). Default size: L = 4096, dim = 64, N = 16, batch = 8 (float32).

- `cpu`, `pscan`: `vmddpm.ops.selective_scan` with that backend.
- `mambapy`: `mambapy.pscan.pscan` (Blelloch scan with its own backward), fed as in mambapy's
  `MambaBlock.selective_scan`: deltaA = exp(delta A), BX = delta B u as (batch, L, dim, N), then
  y = hs @ C; building deltaA/BX and the contraction are inside its timing, like for the others.
- `ref`: the sequential loop is far too slow at L = 4096; it is timed at `--ref-length` (default
  256) and the figure is extrapolated linearly to L (`ref_extrapolated_s`), flagged as such.

Each measurement: `--warmup` untimed runs (numba compilation happens there), then the median of
`--repeats` timed runs. The machine is shared: the JSON records `os.getloadavg()` before and after
and torch's thread count, so that figures can be judged. Writes `results/benchmarks/scan.json`
atomically. Run from the repository root: `.venv/bin/python benchmarks/bench_scan.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vmddpm.io import write_json
from vmddpm.ops.selective_scan import available_backends, selective_scan

log = logging.getLogger("bench_scan")

TARGETS = {"cpu": 0.2, "pscan": 1.0}
"""Time relative to mambapy's pscan that each backend should stay at or below."""


def _inputs(batch: int, dim: int, length: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.rand(batch, dim, length, generator=g) * 0.1 + 0.001,
        "A": -torch.exp(torch.rand(dim, n, generator=g) * 2.7),  # -1 .. -16, like A_log init
        "B": torch.randn(batch, n, length, generator=g),
        "C": torch.randn(batch, n, length, generator=g),
    }


def _step_ours(backend: str, x: dict[str, torch.Tensor]) -> None:
    args = {k: v.clone().requires_grad_() for k, v in x.items()}
    y = selective_scan(**args, backend=backend)
    y.sum().backward()


def _step_mambapy(x: dict[str, torch.Tensor]) -> None:
    from mambapy.pscan import pscan

    # mambapy's layout: x, delta (batch, L, ED); B, C (batch, L, N); A (ED, N).
    u = x["u"].transpose(1, 2).contiguous().requires_grad_()
    delta = x["delta"].transpose(1, 2).contiguous().requires_grad_()
    A = x["A"].clone().requires_grad_()
    B = x["B"].transpose(1, 2).contiguous().requires_grad_()
    C = x["C"].transpose(1, 2).contiguous().requires_grad_()
    delta_a = torch.exp(delta.unsqueeze(-1) * A)
    bx = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
    hs = pscan(delta_a, bx)
    y = (hs @ C.unsqueeze(-1)).squeeze(3)
    y.sum().backward()


def _time(fn: Callable[[], None], warmup: int, repeats: int) -> dict[str, float | list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def _numba_threads() -> int | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--ref-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch and numba threads (0: leave the defaults)")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/scan.json"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if a.threads:
        import numba

        torch.set_num_threads(a.threads)
        numba.set_num_threads(a.threads)
    load_before = os.getloadavg()
    x = _inputs(a.batch, a.dim, a.length, a.state)
    runs: dict[str, dict] = {}
    candidates = {b: (lambda b=b: _step_ours(b, x)) for b in ("cpu", "pscan") if b in available_backends()}
    candidates["mambapy"] = lambda: _step_mambapy(x)
    for name, fn in candidates.items():
        runs[name] = _time(fn, a.warmup, a.repeats)
        log.info("%-8s median %.3f s", name, runs[name]["median_s"])

    xr = _inputs(a.batch, a.dim, a.ref_length, a.state)
    ref = _time(lambda: _step_ours("ref", xr), 0, 1)
    ref["length"] = a.ref_length
    ref["ref_extrapolated_s"] = ref["median_s"] * a.length / a.ref_length
    ref["note"] = f"timed once at L={a.ref_length} (too slow at L={a.length}); extrapolated linearly"
    runs["ref"] = ref
    log.info(
        "ref      %.3f s at L=%d (~%.1f s at L=%d)",
        ref["median_s"],
        a.ref_length,
        ref["ref_extrapolated_s"],
        a.length,
    )

    base = runs["mambapy"]["median_s"]
    ratios = {k: runs[k]["median_s"] / base for k in ("cpu", "pscan") if k in runs}
    ratios["ref"] = ref["ref_extrapolated_s"] / base
    result = {
        "workload": "S6 core forward+backward: y = selective_scan(u, delta, A, B, C); y.sum().backward()",
        "shape": {"batch": a.batch, "dim": a.dim, "length": a.length, "state": a.state, "dtype": "float32"},
        "warmup": a.warmup,
        "repeats": a.repeats,
        "runs": runs,
        "ratio_vs_mambapy": ratios,
        "targets_vs_mambapy": TARGETS,
        "meets_target": {k: ratios[k] <= v for k, v in TARGETS.items() if k in ratios},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": _numba_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    write_json(a.out, result)
    log.info("ratios vs mambapy: %s -> %s", {k: round(v, 3) for k, v in ratios.items()}, a.out)


if __name__ == "__main__":
    main()
