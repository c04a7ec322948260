"""Keep freed CPU memory inside the process, so large tensors are not page-faulted in every step.

Why: PyTorch's CPU tensors come from the C library's `malloc`. glibc serves each block above its mmap
threshold (adaptive, at most 32 MiB on 64-bit systems) with a fresh `mmap` and hands it back to the
kernel on `free`. A training or sampling step whose activations exceed that size therefore makes the
kernel zero and fault in every page of them again, step after step. For the demo-width VM-DDPM on 2
cores at 256^2 this was 1.6 s of kernel time in a 6.6 s step, and it made the step cost grow faster
than the pixel count (`results/benchmarks/scaling.json`, claim C5). At 128^2 the same blocks mostly fit
under the threshold, which is why the ratio between sizes was distorted.

`retain_freed_memory()` tells glibc to serve large blocks from its heap and never to trim that heap
(`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, -1)`), so freed blocks are reused in place. The
price: the resident set stays at the run's peak between steps instead of shrinking. For a training or
sampling process that reaches the same peak every step anyway, that is free. jemalloc or tcmalloc
loaded through `LD_PRELOAD` (PyTorch's CPU tuning guide) have a similar effect for a whole process
tree; this needs no extra library and no wrapper script.

A heap can fragment where an mmap'd block could not: a loop that allocates the very same large block
between small long-lived ones may leave a hole each round. In vmddpm's own training steps the resident
set settles within a few steps (demo-width VM-DDPM, batch 2: at 256^2 the peak stayed flat from step 10
to step 24, 4.5 % above `release`; at 64^2 it grew by 5 MiB, 0.5 %, over 400 steps), and every
training run logs `peak_rss_mb` to MLflow, so a run whose memory keeps growing shows it; set
`cpu_memory: release` for such a run.

`params.yaml: cpu_memory` chooses `retain` (the default) or `release` (glibc's own behaviour). The
setting changes speed and resident memory only, never a result, so no pipeline stage depends on it.
It is process-wide and cannot be undone within the process, so the commands apply it once, when
their compute device is the CPU. Elsewhere than glibc-based Linux (macOS, musl) it does nothing and
says so.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

log = logging.getLogger(__name__)

# <malloc.h>: the mallopt parameters used here
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_retained = False


def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or None where the C library is something else."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def supported() -> bool:
    """Whether this platform's C library is glibc, the only one `retain` acts on."""
    return _glibc() is not None


def retain_freed_memory() -> bool:
    """Make this process reuse freed memory instead of returning it to the OS (see the module).

    Idempotent. Returns whether the setting is in effect; False (with a log line) where the C library
    is not glibc or refused the setting, in which case nothing changed.
    """
    global _retained
    if _retained:
        return True
    libc = _glibc()
    if libc is None:
        log.info("cpu_memory=retain has no effect here: the C library is not glibc")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mmap first: the heap then serves every block; -1 disables trimming (mallopt(3))
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, -1) != 1:
        log.warning("glibc refused mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD); cpu_memory=retain has no effect")
        return False
    _retained = True
    log.info("cpu_memory=retain: freed CPU memory stays in the process for reuse (no per-step page faults)")
    return True


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB. Training logs it to MLflow beside the loss, so a run
    whose host memory keeps growing (see `retain_freed_memory`'s note on fragmentation) shows it."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def configure(policy: str, device_type: str) -> bool:
    """Apply `params.yaml: cpu_memory` for a command computing on `device_type`; returns whether memory is
    now retained. Only CPU computation benefits: a CUDA run leaves the host allocator as it is."""
    if policy == "retain" and device_type == "cpu":
        return retain_freed_memory()
    return _retained
