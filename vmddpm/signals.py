"""SIGINT and SIGTERM as one clean stop: the signal handling of every `vmddpm` command.

Why not Python's default: a `KeyboardInterrupt` raised at an arbitrary bytecode can land inside a C
extension that is calling back into Python (numba's dispatcher, torch's autograd engine): there it is
swallowed (the run goes on) or comes out as a `SystemError` chain. SIGTERM (`kill`, a SLURM time limit,
a cluster pre-emption) has no handler at all by default, so the process dies without closing its MLflow
run or saving its state.

So `install()` (the CLI calls it) gives both signals one handler:

- outside a `deferred()` block it raises `Interrupted` at once (a `KeyboardInterrupt`, so everything
  that cleans up after Ctrl-C cleans up after SIGTERM too, and the MLflow run ends KILLED);
- inside one (a numba kernel call; a training step) it only records the signal; the block raises
  `Interrupted` when it ends, or the code inside polls `stop_requested()` and stops at a point of its
  choosing (the trainer writes a checkpoint of the step it finished first);
- a second signal while one is pending raises at once, deferred or not (the user insists).

A signal the process started with ignored stays ignored, as Python itself does for SIGINT: a shell
without job control (a script's `cmd &`, so also `make test > log &`) starts its background jobs with
SIGINT ignored, and every process under them inherits that across fork and exec. Such a run stops on
SIGTERM only; a test that sends SIGINT starts its process with the default disposition
(tests/conftest.py `signalable`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGINT or SIGTERM); `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


_pending: int | None = None
_depth = 0


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _pending is not None or _depth == 0:
        _pending = signum
        raise Interrupted(signum)
    _pending = signum


def install() -> None:
    """Route SIGINT and SIGTERM to the handler above (main thread only; a no-op elsewhere)."""
    global _pending
    _pending = None
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in HANDLED:
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue  # inherited ignored (a script's background job): keep ignoring it
        signal.signal(sig, _handler)


def stop_requested() -> int | None:
    """The signal number of a pending stop request, else None."""
    return _pending


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a signal does not interrupt: it records the signal and raises when the block ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None:
        raise Interrupted(_pending)


def check() -> None:
    """Raise `Interrupted` when a stop was requested (a polling point outside `deferred()`)."""
    if _pending is not None:
        raise Interrupted(_pending)
