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
    fn = getattr(net, "resolved_scan_backend", None)
    return str(fn(device)) if callable(fn) else "none"


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
