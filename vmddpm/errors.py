"""The one exception type the CLI turns into a one-line message and exit code 2, and the one place an
operating-system error becomes such a line."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a config value). The message is one line that names
    the offending file or key and says how to fix it; the CLI prints it without a traceback."""


#: errno -> (the cause in words, what to do)
_CAUSES: dict[int, tuple[str, str]] = {
    errno.EROFS: ("read-only file system", "write the outputs to a writable place (paths: of params.yaml)"),
    errno.ENOSPC: ("no space left on device", "free space there, then rerun (finished outputs are kept)"),
    errno.EDQUOT: ("disk quota exceeded", "free space there, then rerun (finished outputs are kept)"),
    errno.EACCES: ("permission denied", "make it writable for this user, or write the outputs elsewhere"),
    errno.EPERM: ("operation not permitted", "make it writable for this user, or write outputs elsewhere"),
    errno.ENOTDIR: ("a file where a folder should be", "move that file away, then rerun"),
    errno.EEXIST: ("already exists", "move it away, then rerun"),
    errno.EISDIR: ("a folder where a file should be", "move that folder away, then rerun"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EIO: ("input/output error (failing disk or network file system)", "check the device, then rerun"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n), then rerun"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the link"),
}

#: what torch's zip writer says when a write failed (a full disk: "unexpected pos ... vs ...")
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def blocking_file(path: str | os.PathLike[str]) -> Path | None:
    """The deepest existing ancestor of `path` (itself included) that is a file, not a folder."""
    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def os_error(e: OSError, path: str | os.PathLike[str] | None = None) -> UserError:
    """`e` as one line naming the path and the cause: '<path>: <cause> (<strerror>); <what to do>'.

    `path` is the output the write was for (else the error's own file name); a file in the way of a
    folder is named itself.
    """
    where = Path(path) if path is not None else Path(e.filename) if e.filename else None
    code = e.errno if isinstance(e.errno, int) else -1
    if code in (errno.ENOTDIR, errno.EEXIST) and (e.filename or where):
        blocker = blocking_file(e.filename or where)  # type: ignore[arg-type]
        if blocker is not None:
            return UserError(f"{blocker}: a file where a folder should be; move that file away, then rerun")
    cause, todo = _CAUSES.get(code, (e.strerror or type(e).__name__, "check the path and the device"))
    detail = f" ({e.strerror})" if e.strerror and e.strerror.lower() != cause else ""
    return UserError(f"{where if where is not None else 'a file'}: {cause}{detail}; {todo}")
