"""`vmddpm phantoms`: write deterministic synthetic raw data in a dataset's exact official layout (and its
official-style archive) into a folder of the user's choice; the demo's download stage makes the same
files itself. The generator is `vmddpm.data.phantoms`."""

from __future__ import annotations

from pathlib import Path

from vmddpm.config import Config
from vmddpm.data.phantoms import write_phantoms
from vmddpm.io import output_lock


def phantoms(cfg: Config, dataset: str, out: Path, archive: bool = True) -> Path:
    """Write the phantom raw tree of `dataset` (and, with `archive`, its zip) under `out`; returns the
    archive path (or the tree root). One process per folder."""
    with output_lock(Path(out), "phantoms"):
        return write_phantoms(cfg, dataset, out, archive=archive)
