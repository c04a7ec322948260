"""Shared measurement of one training step: time and peak memory, each point in a fresh process.

Used by `bench_scaling.py` (VM-DDPM, CSM vs attention, over image sizes) and `bench_models.py`
(every preset at 64^2 and 128^2), so both report the same quantity measured the same way.

- Fresh process per point (`run_point`): a process's peak resident set belongs to everything it
  ever did, and the C library may keep freed memory; a spawned interpreter per (model, size)
  makes the peak belong to that point alone. The parent waits at most `timeout_s`, and reports a
  child that dies (e.g. killed for memory) at once instead of waiting out the timeout.
- Threads (`set_threads`): torch's intra-op pool, and numba's (the `cpu` S6 scan), fixed to the same
  count before numba is imported; the count seen after the steps is recorded (`threads_after`).
- Time (`measure_steps`): `warmup` untimed steps, then the median of the timed ones (at least
  `repeats`, fewer only when the steps so far exceed `budget_s`: a single very slow step is then
  its own measurement, see `warmup_steps` and `step_s_all`). CUDA is synchronised inside the step.
- Memory (`measure_steps`): on CUDA, `torch.cuda.max_memory_allocated` during the steps minus the
  allocation before them. On CPU, the peak resident set (VmHWM) during the steps minus the resident
  set right before them, after resetting VmHWM (`/proc/self/clear_refs`) so that a transient peak of
  building the model does not count: the extra memory a training step needs (activations,
  gradients, optimizer state) as the OS sees it (tracemalloc does not see torch's allocator).
  `mem_method` says which one was used. One-off costs are not a step's: `prime_jit` runs the
  S6 `cpu` scan once on a tiny input before the baseline, because numba loading or compiling its
  kernels in the first step raises the peak resident set by ~150 MB that no later step needs.
- Contention: `cpu_s_per_wall_s` (process CPU seconds per wall second over the timed steps, about
  the thread count when the process had the cores to itself) and the load average before/after.
- Ratios (`interleaved_steps`): the machine's speed drifts (tens of percent over minutes on a shared
  VM), so two points timed minutes apart give a ratio with that drift in it. For a ratio, the steps
  of every point run in one process in rounds (a, b, c, a, b, c, ...): drift then hits all of them.
- Where the time goes (`getrusage`, medians over the timed steps): `user_s` (computing), `sys_s`
  (the kernel: mostly zero-filling pages on first touch) and `minor_faults`. glibc serves blocks
  above its mmap threshold (at most 32 MiB) with fresh pages on every allocation, so once a step's
  large tensors cross it, page faults add system time that a linear model of the compute alone does
  not predict; these fields show how much. `apply_cpu_memory` sets params.yaml's `cpu_memory` in the
  point's process as the train/sample commands do (`retain` stops those faults: vmddpm/cpu_memory.py).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


# ----------------------------------------------------------------------------------- environment
def set_threads(threads: int) -> None:
    """Fix torch's (and numba's) CPU thread count; call first in a fresh process."""
    if "numba" not in sys.modules:  # numba sizes the shared OpenMP pool once, at import
        os.environ["NUMBA_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def command_line() -> str:
    """The command that ran this script, as typed from the repository root."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):  # outside the working directory: the absolute path
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), *sys.argv])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def apply_cpu_memory(policy: str, device: str) -> dict[str, Any]:
    """Apply params.yaml's `cpu_memory` policy in this fresh process as `vmddpm train`/`sample` do
    (vmddpm/cpu_memory.py); returns the policy and whether freed memory is now retained."""
    import torch

    from vmddpm import cpu_memory

    retained = cpu_memory.configure(policy, torch.device(device).type)
    return {"cpu_memory": policy, "cpu_memory_retained": retained}


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """Where the numbers come from: platform, versions, cores, threads (load average: see `loadavg`)."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------- one process
def _status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") <= _status_bytes("VmRSS") + 64 * 1024


def measure_steps(
    step: Callable[[], Any], device: str, warmup: int, repeats: int, budget_s: float
) -> dict[str, Any]:
    """Time `step()` (which must synchronise CUDA itself) and the peak memory it needs; see the module."""
    import torch

    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        mem_method = "cuda max_memory_allocated - memory_allocated before the steps"
    else:
        base = _status_bytes("VmRSS")
        reset = _reset_peak_rss()
        mem_method = "cpu VmHWM (reset before the steps) - VmRSS before the steps"
        if not reset:
            mem_method = "cpu VmHWM (process lifetime: could not be reset) - VmRSS before the steps"
    load_before = loadavg()
    times: list[float] = []
    cpu: list[float] = []
    usage: list[tuple[float, float, int]] = []  # user s, sys s, minor faults per step
    for _ in range(warmup + repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        usage.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
        if sum(times) > budget_s:
            break
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    done_warmup = min(warmup, len(times) - 1)  # a single very slow step is its own measurement
    timed, timed_cpu, timed_usage = times[done_warmup:], cpu[done_warmup:], usage[done_warmup:]
    return {
        "step_s_median": statistics.median(timed),
        "step_s_all": times,
        "warmup_steps": done_warmup,
        "peak_mem_mb": (peak - base) / 2**20,
        "mem_method": mem_method,
        "cpu_s_per_wall_s": sum(timed_cpu) / sum(timed),
        "user_s_median": statistics.median(u for u, _, _ in timed_usage),
        "sys_s_median": statistics.median(s for _, s, _ in timed_usage),
        "minor_faults_median": statistics.median(f for _, _, f in timed_usage),
        "threads_after": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


def interleaved_steps(
    steps: dict[str, Callable[[], Any]], warmup: int, rounds: int, budget_s: float
) -> dict[str, dict[str, Any]]:
    """Time several steps in rounds, one step of each per round, after `warmup` untimed rounds; stop
    after `rounds` timed rounds or once the timed rounds exceed `budget_s`. Per key: the wall and
    user-CPU times of every timed round and their medians (memory is not measured here: the points
    share the process)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    user: dict[str, list[float]] = {k: [] for k in steps}
    spent = 0.0
    for _ in range(rounds):
        for key, step in steps.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            wall[key].append(time.perf_counter() - t0)
            user[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_utime - r0.ru_utime)
            spent += wall[key][-1]
        if spent > budget_s:
            break
    return {
        k: {
            "step_s_all": wall[k],
            "step_s_median": statistics.median(wall[k]),
            "user_s_median": statistics.median(user[k]),
        }
        for k in steps
    }


def method_record(
    step: str, warmup: int, repeats: int, budget_s: float, timeout_s: float, device: str
) -> dict[str, Any]:
    """How a point was measured, in words, for the JSON of a benchmark built on this module."""
    return {
        "step": step,
        "time": f"median of {repeats} timed steps after {warmup} warm-up step(s); a point stops once "
        f"its steps exceed {budget_s}s in all (then fewer steps, and when only the warm-up ran, that "
        "one step is the measurement: see warmup_steps and step_s_all)",
        "memory": "CUDA: max_memory_allocated minus allocated before the steps"
        if device.startswith("cuda")
        else "CPU: peak RSS (VmHWM, reset before the steps) minus RSS before the steps, each point in "
        "a fresh process, numba's S6 kernels loaded before (not a step's cost)",
        "budget_s": budget_s,
        "timeout_s": timeout_s,
        "implementation": "benchmarks/_measure.py",
    }


# ------------------------------------------------------------------------------ fresh processes
def _worker(results: Any, fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> None:
    try:
        results.put(("ok", fn(**kwargs)))
    except Exception as e:  # report it; the parent records the point as failed and goes on
        results.put(("error", f"{type(e).__name__}: {e}"))


def run_point(
    fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any], timeout_s: float, label: dict[str, Any]
) -> dict[str, Any]:
    """`fn(**kwargs)` in a fresh spawned interpreter (`fn` must be importable: a module-level function).

    Returns `label` merged with its result, or `label` plus `error` when it raised, died or ran past
    `timeout_s` (then it is killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(results, fn, kwargs))
    proc.start()
    deadline = time.monotonic() + timeout_s
    status, value = "error", f"timed out after {timeout_s:g}s"
    try:
        while time.monotonic() < deadline:
            try:
                status, value = results.get(timeout=1.0)
                break
            except queue_mod.Empty:
                if not proc.is_alive():
                    try:  # it may have put its result just before exiting
                        status, value = results.get(timeout=1.0)
                    except queue_mod.Empty:
                        status, value = "error", f"process died (exit code {proc.exitcode})"
                    break
    finally:
        if status == "ok":
            proc.join(timeout=30)
        if proc.is_alive():  # timed out, interrupted, or stuck after reporting
            proc.kill()
        proc.join()
    if status != "ok":
        return {**label, "error": value}
    return {**label, **value}


# ------------------------------------------------------------------------------- training steps
def prime_jit(model: Any, device: str) -> bool:
    """Forward + backward of a VMUNet on the smallest input it accepts when it runs the numba S6
    kernels (`cpu` backend), so their one-off loading/compilation happens before `measure_steps`
    takes its baseline. Returns whether it did anything."""
    import torch

    backend = getattr(model, "resolved_scan_backend", None)
    if backend is None or backend(torch.device(device)) != "cpu":
        return False
    f = max(8, model.factor)
    x = torch.randn(1, model.in_channels, f, f, device=device)
    model(x, torch.zeros(1, dtype=torch.long, device=device)).sum().backward()
    model.zero_grad(set_to_none=True)
    return True


def denoiser_step(
    model: Any, batch: int, size: int, device: str, channels: int = 1, timesteps: int = 1000
) -> Callable[[], None]:
    """One diffusion training step of `model(x, t) -> eps` on random data: forward, MSE to the noise,
    backward, AdamW step (the optimizer of `vmddpm.stages.train`: torch's fused AdamW); its state is
    created in the first step."""
    import torch

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(dev)
    t = torch.randint(0, timesteps, (batch,), generator=gen).to(dev)
    noise = torch.randn(x.shape, generator=gen).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, t), noise)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step
