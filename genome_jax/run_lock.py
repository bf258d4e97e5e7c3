"""One writer per run folder: an exclusive OS file lock (flock) on OUTPUT_DIR/.genome-run.lock.

    with run_lock.hold(out_dir):      # UserError at once if another live process holds it
        ...

The kernel releases a flock when its holder dies, however it dies (SIGKILL, OOM, a reboot), so a lock file left by a
dead run never blocks a resume: only a live holder does. The file holds the holder's pid, for the error message.
The descriptor is not inherited by child processes (PEP 446), so a lingering evaluator worker never holds the lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from genome_jax.errors import UserError

LOCK_NAME = ".genome-run.lock"


def _holder_pid(path: Path) -> str:
    """The pid written by the holder (it writes right after locking: retry briefly), or '?'."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "?"


def _busy(folder: Path, path: Path) -> UserError:
    return UserError(f"output_dir {folder}: another genome run (pid {_holder_pid(path)}) is writing to this "
                     "folder; wait for it to end, or use another output folder")


def acquire(folder: str | os.PathLike) -> int:
    """Lock `folder` (created if missing) for this process; returns the lock's file descriptor.
    Raises UserError naming the folder and the holder's pid when another live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, path) from None
        except OSError as e:  # a file system without locks: say so rather than run two writers unawares
            os.close(fd)
            raise UserError(f"output_dir {folder}: cannot lock {path} ({e.strerror})") from None
        try:  # the file may have been replaced between open and lock (the folder removed and remade): retry
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_free(folder: str | os.PathLike) -> None:
    """Raise the same UserError as `acquire` if a live process holds `folder`'s lock; creates nothing (a cheap
    early look, before a run loads anything; `acquire` is what guarantees one writer)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or unreadable: acquire will say)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(folder, path) from None
    except OSError:
        pass
    finally:
        os.close(fd)  # closing drops a shared lock taken here


def release(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(folder: str | os.PathLike) -> Iterator[None]:
    fd = acquire(folder)
    try:
        yield
    finally:
        release(fd)
