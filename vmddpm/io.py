"""Atomic files and folders: a crash or a kill never leaves a half-written output under a final name.

Every stage writes through these helpers:
- a file goes to a temporary file in the same folder, is flushed and fsynced, then `os.replace`d over
  the target (atomic on POSIX), so a reader sees the old file or the new one, never a mix;
- a folder is built beside its final name and swapped in only when complete (`build_folder`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    `suffix` defaults to the target's suffix so writers that infer the format from the name
    (Pillow, matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.",
        suffix=suffix if suffix is not None else path.suffix,
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; final files get the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], Any]) -> Path:
    """Call `writer(fh)` on a binary handle of a temp file, then move it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_png(path: str | Path, image: Any) -> Path:
    """A (H, W) uint8 array as an 8-bit grayscale PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image, mode="L").save(tmp, format="PNG")
    return Path(path)


def write_png_grid(path: str | Path, images: Any, pad: int = 2) -> Path:
    """(N, H, W) uint8 images as one grayscale PNG grid (ceil(sqrt(N)) per row, white gutters).

    numpy, not torchvision's make_grid: importing torchvision costs a process seconds (it pulls in
    torch._dynamo), and the sample and train stages need nothing else from it.
    """
    import numpy as np

    imgs = np.asarray(images, dtype=np.uint8)
    n, h, w = imgs.shape
    ncol = max(1, int(np.ceil(np.sqrt(n))))
    nrow = -(-n // ncol)
    grid = np.full((pad + nrow * (h + pad), pad + ncol * (w + pad)), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = img
    return write_png(path, grid)


@contextlib.contextmanager
def build_folder(final: str | Path, *, tag: str = "partial", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder path beside `final`; when the block succeeds it becomes `final`.

    - `replace=True`: the temporary path is `.<name>.<tag>` (a stale one from a killed run is removed
      first; the block creates the folder); an existing `final` is moved aside and deleted after the
      swap, so readers see the old folder or the new one.
    - `replace=False`: the temporary folder is unique (two concurrent builders never collide) and an
      existing `final` must be empty; otherwise the swap raises OSError and nothing is written.

    On any error in the block the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.parent / f".{final.name}.old"
    if replace:
        tmp = final.parent / f".{final.name}.{tag}"
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=f".{tag}", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a final folder gets the usual mode
    try:
        yield tmp
        if final.exists():
            if replace:
                os.replace(final, old)
            else:
                final.rmdir()  # OSError unless empty
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
