"""Atomic files and folders: a crash or a kill never leaves a half-written output under a final name.

Every stage writes through these helpers:
- a file goes to a temporary file in the same folder, is flushed and fsynced, then `os.replace`d over
  the target (atomic on POSIX), so a reader sees the old file or the new one, never a mix;
- a folder is built beside its final name, in a temporary folder of its own process (host and pid in
  its name), and swapped in only when complete (`build_folder`);
- one process per output: `output_lock` holds an exclusive lock beside the output for the whole stage
  and tells a second process which pid holds it;
- `ensure_writable` checks the output folders before any compute, so a read-only, full or blocked
  place is found in a second, not at the first checkpoint hours later;
- an operating-system error while writing is one line naming the output and the cause
  (`vmddpm.errors.os_error`), never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from vmddpm.errors import TORCH_WRITE_FAILURES, UserError, os_error

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    `suffix` defaults to the target's suffix so writers that infer the format from the name
    (Pillow, matplotlib) still work. A failed write (read-only, full or blocked place; torch's
    "unexpected pos" of a full disk) is a one-line UserError naming `path`; `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.",
            suffix=suffix if suffix is not None else path.suffix,
            dir=path.parent,
        )
        os.close(fd)
    except OSError as e:
        raise os_error(e, path) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; final files get the usual mode
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.filename in (None, str(tmp_path), str(path)):  # this write failed (not a read inside the block)
            raise os_error(e, path) from None
        raise
    except RuntimeError as e:
        tmp_path.unlink(missing_ok=True)
        if any(s in str(e) for s in TORCH_WRITE_FAILURES):
            raise write_failed(path, str(e)) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_failed(path: Path, detail: str) -> UserError:
    """A write that failed without an errno (torch's zip writer): most often a full disk."""
    free = free_bytes(path.parent)
    first = detail.strip().splitlines()[0][:120] if detail.strip() else "write failed"
    if free is not None and free < 64 << 20:
        return UserError(
            f"{path}: no space left on device ({free} bytes free; {first}); free some space there, "
            "then rerun (finished outputs are kept)"
        )
    return UserError(f"{path}: write failed ({first}); check the device and its free space, then rerun")


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


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


def read_png_grid(path: str | Path, size: int, n: int, pad: int = 2) -> Any:
    """The first `n` (size x size) images of a grid written by `write_png_grid`, as (n, size, size) uint8."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        grid = np.asarray(im.convert("L"))
    ncol = (grid.shape[1] - pad) // (size + pad)
    if ncol < 1 or grid.shape[1] != pad + ncol * (size + pad):
        raise ValueError(f"{path}: a {grid.shape[1]}-pixel-wide grid does not hold {size}-pixel images")
    out = []
    for i in range(n):
        top, left = pad + (i // ncol) * (size + pad), pad + (i % ncol) * (size + pad)
        if top + size > grid.shape[0]:
            break
        out.append(grid[top : top + size, left : left + size])
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


_HOST = socket.gethostname().replace(".", "_") or "host"


def temp_prefix(final: Path, tag: str) -> str:
    """Prefix of this process's temporary folders for `final`: `.<name>.<tag>.<host>.<pid>.`"""
    return f".{final.name}.{tag}.{_HOST}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: Path, tags: tuple[str, ...]) -> None:
    """Delete temporary folders of `final` left by killed processes of this host (their pid is gone);
    those of live processes, or of other hosts, are left alone. Old fixed names (no pid) are stale."""
    for tag in tags:
        for p in final.parent.glob(f".{final.name}.{tag}*"):
            rest = p.name[len(f".{final.name}.{tag}") :]
            parts = rest.split(".")
            if rest == "":
                stale = True
            elif len(parts) >= 3 and parts[1] == _HOST and parts[2].isdigit():
                stale = not _pid_alive(int(parts[2]))
            else:
                stale = False
            if stale:
                log.info("removing %s (left by a killed run)", p)
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def build_folder(final: str | Path, *, tag: str = "partial", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder path beside `final`; when the block succeeds it becomes `final`.

    The temporary folder is this process's own (`.<name>.<tag>.<host>.<pid>.<random>`, created): two
    concurrent builders never share one, and those left by killed processes are removed first.

    - `replace=True`: an existing `final` is moved aside and deleted after the swap, so readers see
      the old folder or the new one.
    - `replace=False`: an existing `final` must be empty; otherwise the swap raises OSError and nothing
      is written.

    On any error in the block the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final, (tag, "old"))
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final, tag), dir=final.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a final folder gets the usual mode
    except OSError as e:
        raise os_error(e, final) from None
    old: Path | None = None
    try:
        yield tmp
        if final.exists():
            if replace:
                old = Path(tempfile.mkdtemp(prefix=temp_prefix(final, "old"), dir=final.parent))
                os.replace(final, old / final.name)
            else:
                final.rmdir()  # OSError unless empty
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists() and (old / final.name).exists():
            os.replace(old / final.name, final)  # put the previous folder back
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- one process per output
def lock_path(output: str | Path) -> Path:
    """The lock file of an output: `.<name>.lock` beside it (never inside a declared output folder)."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def lock_holder(lock: Path) -> str:
    """Who holds `lock`, from what the holder wrote into it: 'pid N' (plus the host when not this one)."""
    try:
        words = lock.read_text().split()
    except (OSError, UnicodeDecodeError):
        words = []
    if not words or not words[0].isdigit():
        return "another process"
    host = words[1] if len(words) > 1 else _HOST
    return f"pid {words[0]}" + (f" on {host}" if host != _HOST else "")


@contextlib.contextmanager
def output_lock(output: str | Path, command: str) -> Iterator[None]:
    """Hold the exclusive lock of `output` for the block; a second holder gets a one-line UserError
    naming the first one's pid. An flock: the kernel releases it when its process dies (kill -9
    included), so a stale lock never blocks a rerun."""
    from filelock import FileLock, Timeout

    output = Path(output)
    lock = lock_path(output)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        flock = FileLock(str(lock), timeout=0)
        # A holder writes its pid right after it wins the flock and clears it just before it lets go:
        # while the file is empty, try again (for up to a second) to read the pid or to win the lock.
        for _ in range(100):
            try:
                flock.acquire()
                break
            except Timeout:
                holder = lock_holder(lock)
                if holder != "another process":
                    break
                time.sleep(0.01)
        if not flock.is_locked:
            raise UserError(
                f"{output}: another `vmddpm {command}` ({holder}) is writing it; wait for it to "
                f"finish or stop it, then rerun (one process per output; lock {lock.name})"
            )
        fd = os.open(lock, os.O_WRONLY)  # held: write who holds it (waiters only read)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {_HOST} vmddpm {command}\n".encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise os_error(e, output) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # still held: clear the pid, so no waiter reads a stale one
            os.truncate(lock, 0)
        flock.release()


def ensure_writable(*folders: str | Path) -> None:
    """Create each folder and write and delete a small probe file in it: a read-only file system, a
    full disk, a missing permission or a file in the way is a one-line UserError before any compute."""
    for folder in map(Path, folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".vmddpm-write-probe.", dir=folder)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            raise os_error(e, folder) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
