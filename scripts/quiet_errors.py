"""No traceback on stderr without --debug: library log records and background-thread failures go to a log file.

`install()` (the CLI calls it before any command runs, unless --debug) routes logging:
- records of our own packages (genome_jax, evaluators, scripts) at WARNING and above: one line on stderr (the
  first line of the message, no traceback), and in full to the log file;
- records of everyone else (orbax, tensorstore, absl, jax; often from background threads while a damaged
  checkpoint is read, with a traceback attached): to the log file only.
Uncaught exceptions of threads and unraisable exceptions also go to the log file. The file
(~/.cache/genome-jax/logs/genome-TIME-PID.log, or $GENOME_LOG_DIR) is created only when something is written to it;
`log_traceback(e)` writes an internal error's traceback there and returns the path for the one-line message.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from genome_jax.model_store import cache_root

OURS = ("genome_jax", "evaluators", "scripts", "__main__")
_path: Path | None = None


def log_path() -> Path:
    global _path
    if _path is None:
        root = os.environ.get("GENOME_LOG_DIR")
        if root is None:
            root = cache_root() / "logs"
        _path = Path(root) / f"genome-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    return _path


def _append(text: str) -> Path | None:
    try:
        p = log_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        return p
    except OSError:  # an unwritable home: the details are lost, stderr still stays clean
        return None


class _FileHandler(logging.Handler):
    """Every record, with its traceback, appended to the log file (opened per record: created only if needed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _append(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
                    .format(record))
        except Exception:
            pass


class _OneLineStderr(logging.Handler):
    """Our own warnings, one line each, never a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().strip()
            first = msg.splitlines()[0] if msg else record.levelname.lower()
            sys.stderr.write(first + "\n")
            sys.stderr.flush()
        except Exception:
            pass


def install() -> None:
    """Route logging, thread and unraisable exceptions as above (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(h, _OneLineStderr) for h in root.handlers):
        return
    for h in list(root.handlers):
        root.removeHandler(h)
    stderr, file = _OneLineStderr(logging.WARNING), _FileHandler(logging.WARNING)
    root.addHandler(stderr)
    root.addHandler(file)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)

    def thread_hook(args) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        _append(f"exception in thread {name}:\n"
                + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    def unraisable_hook(u) -> None:
        _append(f"unraisable exception ({u.err_msg or 'ignored'} {u.object!r}):\n"
                + "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


def log_traceback(e: BaseException) -> Path | None:
    """Append `e`'s traceback to the log file; returns the file's path (None if it could not be written)."""
    return _append("internal error:\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
