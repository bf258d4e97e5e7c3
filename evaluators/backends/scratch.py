"""Scratch folders for exported adapters and engine temp files, and the removal of those left by dead processes.

Every folder is `<parent>/<prefix><pid>-*`: a folder whose pid no longer runs belonged to a process that died
(a SIGKILLed run or worker) and is removed by the next process that makes one of the same prefix."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile


def scratch_dir(prefix: str = "genome-adapters-") -> str:
    """A fresh folder `<prefix><pid>-*` for exported adapters, in tmpfs (/dev/shm) where it exists and is writable.
    Folders of the same prefix left by a process that died (a SIGKILLed run) are removed first."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    remove_dead_pid_dirs(base or tempfile.gettempdir(), prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)


def remove_dead_pid_dirs(parent: str, prefix: str) -> None:
    """Remove the folders `parent/<prefix><pid>-*` whose process no longer exists."""
    for d in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*-*")):
        pid = os.path.basename(d)[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
