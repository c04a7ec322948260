"""Full-state checkpoints: atomic writes, safe loads, RNG capture.

Why this module: a killed training run must resume to the *same* weights as an uninterrupted one, and
a crash while writing must never destroy the last good checkpoint. So:

- `save_checkpoint` writes to a temporary file in the same folder (`vmddpm.io.atomic_path`), fsyncs
  it and `os.replace`s it over the target: a reader sees the old file or the new one, never a mix,
  and a failed write (full disk, kill, exception while serialising) leaves the old file untouched.
- `load_checkpoint` uses `torch.load(weights_only=True)` (no pickled code runs), turns a truncated or
  corrupt file into a one-line `UserError`, and refuses a checkpoint whose model signature differs
  from the requested one, naming the differing keys.
- `capture_rng_state` / `restore_rng_state` store python, numpy, torch and CUDA generator states as
  tensors and plain types only, so `weights_only=True` can read them back.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmddpm.errors import UserError
from vmddpm.io import atomic_path

log = logging.getLogger(__name__)

#: name pattern of periodic checkpoints inside a train folder: step_00001234.pt
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temp file + fsync + os.replace).

    On any failure the temp file is removed and an existing `path` is left exactly as it was.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    log.debug("saved checkpoint %s", path)
    return path


def load_checkpoint(
    path: str | Path, expect: dict[str, Any] | None = None, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    `expect`: the model signature the caller is about to load into (`model_signature(cfg, name)`); a
    checkpoint whose stored `signature` differs is refused with the differing keys named.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; train the model first (vmddpm train)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: truncated or corrupt checkpoint ({reason}); delete it to resume from an earlier "
            "checkpoint in the same folder, or retrain"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a vmddpm checkpoint (got {type(state).__name__}); delete it")
    if expect is not None:
        check_signature(path, state.get("signature"), expect)
    return state


def check_signature(path: Path, stored: dict[str, Any] | None, expect: dict[str, Any]) -> None:
    """Raise UserError naming every key whose value differs between `stored` and `expect`."""
    if stored is None:
        raise UserError(f"{path}: checkpoint has no model signature; it was not written by vmddpm, delete it")
    keys = sorted(set(stored) | set(expect))
    diff = [k for k in keys if _norm(stored.get(k, "<missing>")) != _norm(expect.get(k, "<missing>"))]
    if diff:
        detail = ", ".join(
            f"{k}: checkpoint {stored.get(k, '<missing>')!r} != config {expect.get(k, '<missing>')!r}"
            for k in diff
        )
        raise UserError(
            f"{path}: checkpoint is from another model ({detail}); use the matching --model/params or "
            "delete the folder to train from scratch"
        )


def _norm(v: Any) -> Any:
    """Lists and tuples compare equal (a torch round trip may turn one into the other)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The periodic checkpoint `step_*.pt` with the highest step in `directory`, else `last.pt`, else None.

    Temp files of an interrupted write (`.step_....pt.xxxx.pt`) start with a dot and are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in directory.iterdir():
        m = STEP_PATTERN.match(p.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    if best is not None:
        return best[1]
    last = directory / "last.pt"
    return last if last.is_file() else None


# ------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain types (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds %d CUDA RNG states, %d devices here: not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
