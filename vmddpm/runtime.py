"""Where and how a stage runs: device, determinism, the S6 scan backend in use, and state hashes.

Every stage that runs a network (train, gan, sample, sweep, evaluate) resolves its device here from its
own knob (`train.device`, `sample.device`, `eval.device`), so the rule and the message are the same
everywhere; the scan backend a vmunet network resolved to is read here and tagged on every MLflow run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch
from torch import nn

from vmddpm.errors import UserError


def resolve_device(choice: str, knob: str = "train.device") -> torch.device:
    """`auto` = CUDA when visible, else CPU; `cuda` without a visible device is a one-line error naming
    `knob`. Under `torchrun` (LOCAL_RANK set) a CUDA device is this rank's."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{knob}=cuda but no CUDA device is visible; set {knob}=auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(choice)


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels (bit-identical resume on CPU); CUDA also needs the cuBLAS workspace knob."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


def scan_backend_of(net: nn.Module, device: torch.device) -> str:
    """The resolved S6 backend of a vmunet net, "none" for nets without one."""
    return explain_scan_backend(net, device)[0]


def explain_scan_backend(net: nn.Module, device: torch.device) -> tuple[str, str]:
    """(backend, why) for a network on `device`: what `model.scan_backend` resolved to and the reason
    (`auto` names the faster backends it passed over and why), for the log line of every run."""
    fn = getattr(net, "explain_scan_backend", None)
    if not callable(fn):
        return "none", "no S6 path"
    backend, why = fn(device)
    return str(backend), str(why)


def is_out_of_memory(exc: BaseException) -> bool:
    """A device ran out of memory: CUDA's `torch.OutOfMemoryError`, or the CPU allocator's failure
    (a plain RuntimeError from c10's DefaultCPUAllocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def out_of_memory(stage: str, device: torch.device, knobs: Mapping[str, object], backend: str) -> UserError:
    """The one-line error for an out-of-memory error in `stage` (CUDA or the CPU allocator): what ran
    out, the knobs that were in force (`knobs`: dotted key -> value) and the ways out, instead of a
    traceback."""
    used = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in knobs.items())
    ways = {
        "train": "lower train.batch_size and raise train.grad_accum by the same factor (same effective "
        "batch), set model.checkpointing=true (vmunet presets: recompute activations in the backward)",
        "sample": "lower sample.batch_size",
    }.get(stage, "lower the batch size")
    if backend == "pscan" and device.type == "cuda":
        ways += (
            ", or install mamba-ssm (pip install -c constraints.txt -e '.[cuda]') for the cuda scan backend"
        )
    elif backend == "ref":
        ways += ", or set model.scan_backend=auto (ref is the slow, memory-hungry reference)"
    return UserError(f"{stage}: {device} ran out of memory ({used}, scan backend {backend}); {ways}")


def state_hash(state: Mapping[str, torch.Tensor], *, dtypes: bool = True) -> str:
    """sha256 over a state dict's names and raw tensor bytes (equal hash <=> bit-identical weights).

    `dtypes=False` leaves the dtype names out: the digest metrics.json records for the random feature
    extractor (`weights_sha256`), kept as it was first defined so recorded digests stay comparable.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        if dtypes:
            h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
