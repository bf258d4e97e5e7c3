"""Graceful stop on SIGTERM / SIGINT: what schedulers (Slurm, Kubernetes, systemd) and Ctrl-C send.

    with stopping.graceful_stop(progress=lambda: f"after generation {last_saved()}"):
        ...                                   # the first signal raises Stopped here (cleanup runs in `finally`)
        with stopping.deferred():             # a signal inside is held until the block ends (e.g. orbax's save call)
            ckpt.save(g, state)

The first signal raises `Stopped` in the main thread wherever it is (waiting for the evaluator, computing), so every
`finally` runs: the save in flight is finished, the evaluator worker is stopped. A second signal, during that cleanup,
exits at once (`os._exit`), which is no worse than SIGKILL: a run resumes from its last complete checkpoint either way.
The CLI prints `Stopped.line()` and exits with `Stopped.exit_code` (143 for SIGTERM, 130 for SIGINT).
Imports nothing of ours.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """Raised in the main thread by the first SIGTERM/SIGINT inside `graceful_stop`. A BaseException (like
    KeyboardInterrupt) so that library code catching `Exception` does not swallow it."""

    def __init__(self, signum: int, progress: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.progress = progress  # "after generation 3": filled in by the command on the way out

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT

    def line(self) -> str:
        where = f" {self.progress}" if self.progress else ""
        return f"genome: stopped by {self.name}{where}; re-run the same command to resume"


class _State:
    def __init__(self):
        self.active = 0  # nesting depth of graceful_stop
        self.signum: int | None = None  # the first signal received
        self.defer = 0  # depth of deferred() blocks
        self.pending = False  # a signal arrived inside a deferred block


_state = _State()


def _handler(signum: int, frame) -> None:
    if _state.signum is not None:  # second signal: no more cleanup, exit now (a resume is as after SIGKILL)
        try:
            os.write(2, f"genome: stopped by {signal.Signals(signum).name} (second signal: exiting at once); "
                        "re-run the same command to resume\n".encode())
        finally:
            os._exit(128 + signum)
    _state.signum = signum
    if _state.defer:
        _state.pending = True
        return
    raise Stopped(signum)


def stop_requested() -> int | None:
    """The signal number received inside `graceful_stop`, or None."""
    return _state.signum


@contextlib.contextmanager
def graceful_stop(progress: Callable[[], str | None] | None = None) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into `Stopped` inside the block (main thread only; elsewhere a no-op). `progress()`,
    called as Stopped leaves the block, says how far the work got ("after generation 3") for the one-line message.
    The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    if not _state.active:
        _state.signum, _state.pending, _state.defer = None, False, 0
    _state.active += 1
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    except Stopped as e:
        if progress is not None and e.progress is None:
            try:
                e.progress = progress()
            except Exception:  # the message must never fail
                pass
        raise
    finally:
        _state.active -= 1
        for s, h in previous.items():
            signal.signal(s, h)
        if not _state.active:
            _state.signum, _state.pending, _state.defer = None, False, 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a first signal until the block ends (a call that must not be torn halfway, such as handing a checkpoint
    to orbax's writer thread); then raise Stopped. A second signal still exits at once."""
    _state.defer += 1
    try:
        yield
    finally:
        _state.defer -= 1
    if not _state.defer and _state.pending and _state.active:
        _state.pending = False
        raise Stopped(_state.signum)


__all__ = ["Stopped", "graceful_stop", "deferred", "stop_requested", "SIGNALS"]
