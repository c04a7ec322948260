"""Peak memory and time of the `pscan` S6 backend, forward + backward, old (unchunked) vs new (chunked).

Workload: y = selective_scan(u, delta, A, B, C, backend="pscan"); y.sum().backward() with fp32 inputs
u, delta (batch, dim, L), A (dim, N), B, C (batch, N, L), all requiring grad (the inputs of
`bench_scan.py`). The inputs are created before the baseline, and every step drops the previous
step's gradients first: the figure is what one forward + backward needs above its inputs (output,
input gradients, working memory).

- `new`: `vmddpm.ops.scan_pscan` of this tree, at its default chunk for the device (`PSCAN_CHUNK` on
  CPU, `PSCAN_CHUNK_ACCEL` elsewhere) and at every `--chunks`.
- `old`: the pscan of `--old-rev` (default 8928b3b, before the chunked rewrite): its
  `vmddpm/ops/selective_scan.py` is read with `git show` into a temporary module and called side by
  side in the same way.

Memory: each point in a fresh process (`benchmarks/_measure.py`: peak RSS, VmHWM reset before the
steps, minus RSS before them), reported in MiB and as a multiple of one (batch, dim, L) fp32 tensor
(the issue's acceptance 2: <= 16x at b1 d512 L16384 N16). Time: wall and user-CPU medians of those
steps; and, for the old/new speed ratio, both run in rounds in one fresh process
(`interleaved_steps`), at this memory shape and at `bench_scan.py`'s shape (b8 d64 L4096 N16), so that
the drift of a shared machine hits both alike. Tensor ops: the aten ops of one forward + backward that
are not views (`ops_per_step`), counted by a dispatch mode after the timed steps: on a GPU each one
is at least one kernel launch, which is what the chunk length trades against memory there.

`--device cuda` runs the same points on a GPU (memory: max_memory_allocated above the allocation
before the steps).

Writes `results/benchmarks/pscan_memory.json`. Run from the repository root:
    .venv/bin/python benchmarks/bench_pscan_memory.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from _measure import (
    command_line,
    interleaved_steps,
    loadavg,
    machine_info,
    measure_steps,
    method_record,
    run_point,
    set_threads,
)

log = logging.getLogger("bench_pscan_memory")
ROOT = Path(__file__).resolve().parents[1]
TARGET_MULTIPLE = 16.0
"""Acceptance 2 of issue 15: peak <= 16x one (batch, dim, L) fp32 tensor above the inputs."""


def _scan_fn(impl: str, old_path: str | None, chunk: int | None, device: str = "cpu"):
    """selective_scan(**inputs) of the old module or of this tree (with its chunk on `device` set to
    `chunk`)."""
    if impl == "old":
        spec = importlib.util.spec_from_file_location("_old_selective_scan", old_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return lambda **x: mod.selective_scan(**x, backend="pscan")
    from vmddpm.ops import scan_pscan
    from vmddpm.ops.selective_scan import selective_scan

    if chunk:
        setattr(scan_pscan, "PSCAN_CHUNK" if device == "cpu" else "PSCAN_CHUNK_ACCEL", chunk)
    return lambda **x: selective_scan(**x, backend="pscan")


def _inputs(shape: tuple[int, int, int, int], device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """bench_scan.py's inputs, as leaves requiring grad."""
    import torch

    batch, dim, length, n = shape
    g = torch.Generator().manual_seed(seed)
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.rand(batch, dim, length, generator=g) * 0.1 + 0.001,
        "A": -torch.exp(torch.rand(dim, n, generator=g) * 2.7),
        "B": torch.randn(batch, n, length, generator=g),
        "C": torch.randn(batch, n, length, generator=g),
    }
    return {k: v.to(device).requires_grad_() for k, v in x.items()}


def _step(fn, x: dict[str, Any]):
    import torch

    def step() -> None:
        for v in x.values():
            v.grad = None
        fn(**x).sum().backward()
        if x["u"].is_cuda:
            torch.cuda.synchronize()

    return step


def _count_ops(step) -> int:
    """aten ops of one step that are not views (each is at least one kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def point(
    impl: str,
    old_path: str | None,
    chunk: int | None,
    shape: list[int],
    threads: int,
    warmup: int,
    repeats: int,
    budget_s: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """One (implementation, chunk, shape) point in its own process: peak memory, time, tensor ops."""
    set_threads(threads)
    import torch

    fn = _scan_fn(impl, old_path, chunk, device)
    x = _inputs(tuple(shape), device)
    from vmddpm.ops import scan_pscan

    used_chunk = scan_pscan.default_chunk(torch.device(device)) if impl == "new" else None
    step = _step(fn, x)
    r = measure_steps(step, device, warmup, repeats, budget_s)
    unit_mb = shape[0] * shape[1] * shape[2] * 4 / 2**20
    extra = {
        "chunk": used_chunk,
        "peak_multiple": r["peak_mem_mb"] / unit_mb,
        "ops_per_step": _count_ops(step),
    }
    return {**r, **extra}


def speed(
    old_path: str,
    shape: list[int],
    threads: int,
    warmup: int,
    rounds: int,
    budget_s: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """Old vs new (default chunk) in rounds in one process: wall and user-CPU medians and ratios."""
    set_threads(threads)
    x = _inputs(tuple(shape), device)
    steps = {impl: _step(_scan_fn(impl, old_path, None, device), x) for impl in ("old", "new")}
    r = interleaved_steps(steps, warmup, rounds, budget_s)
    return {
        "runs": r,
        "new_over_old_wall": r["new"]["step_s_median"] / r["old"]["step_s_median"],
        "new_over_old_user": r["new"]["user_s_median"] / r["old"]["user_s_median"],
    }


def _shape(text: str) -> list[int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected batch,dim,L,N; got {text!r}")
    return parts


def _label(shape: list[int]) -> dict[str, int]:
    return dict(zip(("batch", "dim", "length", "state"), shape, strict=True))


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    """One row of the summary tables."""
    keys = ("impl", "chunk", "peak_mem_mb", "peak_multiple", "step_s_median", "user_s_median", "ops_per_step")
    keys += ("error",)
    out = {k: r[k] for k in keys if k in r}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()} | {
        "shape": "x".join(str(v) for v in r["shape"].values())
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=_shape, default=[1, 512, 16384, 16], help="batch,dim,L,N")
    ap.add_argument("--chunks", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument(
        "--lengths", type=int, nargs="*", default=[4096, 65536], help="new only, at --shape's other sizes"
    )
    ap.add_argument(
        "--speed-shapes", type=_shape, nargs="*", default=[[8, 64, 4096, 16], [1, 512, 16384, 16]]
    )
    ap.add_argument("--old-rev", default="8928b3b", help="git revision of the old (unchunked) pscan")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (any torch device)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of the old/new speed comparison")
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results/benchmarks/pscan_memory.json")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    from vmddpm.io import write_json
    from vmddpm.ops import scan_pscan

    default = scan_pscan.default_chunk(torch.device(a.device))
    old_src = subprocess.run(
        ["git", "show", f"{a.old_rev}:vmddpm/ops/selective_scan.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    kw = {"threads": a.threads, "warmup": a.warmup, "repeats": a.repeats, "budget_s": a.budget_s}
    kw["device"] = a.device
    load_before = loadavg()
    # (impl, chunk, shape): the acceptance shape old and new at every chunk; new at other lengths;
    # old and new at the speed shapes.
    plan = [("old", None, a.shape), ("new", None, a.shape)]
    plan += [("new", c, a.shape) for c in a.chunks if c != default]
    plan += [("new", None, [a.shape[0], a.shape[1], n, a.shape[3]]) for n in a.lengths if n != a.shape[2]]
    plan += [(impl, None, s) for s in a.speed_shapes if s != a.shape for impl in ("old", "new")]
    memory, speeds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        old_path = str(Path(tmp) / "old_selective_scan.py")
        Path(old_path).write_text(old_src)
        for impl, chunk, shape in plan:
            args = {"impl": impl, "old_path": old_path, "chunk": chunk, "shape": shape, **kw}
            r = run_point(point, args, a.timeout_s, {"impl": impl, "shape": _label(shape)})
            memory.append(r)
            log.info("%s", _brief(r))
        for shape in a.speed_shapes:
            args = {"old_path": old_path, "shape": shape, "threads": a.threads, "warmup": a.warmup}
            args |= {"rounds": a.rounds, "budget_s": a.budget_s, "device": a.device}
            r = run_point(speed, args, a.timeout_s, {"shape": _label(shape)})
            speeds.append(r)
            log.info("speed %s: %s", shape, r.get("error") or f"new/old wall {r['new_over_old_wall']:.2f}")

    acc = [r for r in memory if r["shape"] == _label(a.shape)]
    old = next((r for r in acc if r["impl"] == "old"), {})
    new = next((r for r in acc if r["impl"] == "new" and r.get("chunk") == default), {})
    summary = {
        "shape": _label(a.shape),
        "default_chunk": default,
        "old_peak_multiple": old.get("peak_multiple"),
        "new_peak_multiple": new.get("peak_multiple"),
        "target_multiple": TARGET_MULTIPLE,
        "meets_target": new.get("peak_multiple") is not None and new["peak_multiple"] <= TARGET_MULTIPLE,
        "chunk_sweep": sorted(
            (_brief(r) for r in acc if r["impl"] == "new"), key=lambda r: r.get("chunk") or 0
        ),
        "length_sweep": sorted(
            (
                _brief(r)
                for r in memory
                if r["impl"] == "new"
                and r.get("chunk") == default
                and [r["shape"][k] for k in ("batch", "dim", "state")] == [a.shape[0], a.shape[1], a.shape[3]]
            ),
            key=lambda r: int(r["shape"].split("x")[2]),
        ),
        "old_vs_new": [
            _brief(r)
            for r in memory
            if r["shape"] in [_label(s) for s in a.speed_shapes] and r.get("chunk") in (None, default)
        ],
        "new_over_old_time_interleaved": {
            "x".join(str(v) for v in s["shape"].values()): {
                "wall": s.get("new_over_old_wall"),
                "user": s.get("new_over_old_user"),
                "error": s.get("error"),
            }
            for s in speeds
        },
    }
    result = {
        "workload": "y = selective_scan(u, delta, A, B, C, backend='pscan'); y.sum().backward(); fp32, "
        "all five inputs require grad; memory above the inputs",
        "unit": "peak_multiple = peak_mem_mb / one (batch, dim, L) fp32 tensor",
        "old": f"pscan of {a.old_rev} (vmddpm/ops/selective_scan.py via git show)",
        "summary": summary,
        "memory_points": memory,
        "speed_interleaved": speeds,
        "method": method_record(
            "pscan forward+backward", a.warmup, a.repeats, a.budget_s, a.timeout_s, a.device
        ),
        "machine": machine_info(a.threads, a.device),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "command": command_line(),
    }
    write_json(a.out, result)
    log.info("-> %s", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
