"""Fault injection for the reliability tests: kill this very process at a named point of a run.

    GENOME_FAULT_POINT=checkpoint_committed:3 genome run ...    # SIGKILL the 3rd time that point is reached
    GENOME_FAULT_POINT=scored:2:TERM genome run ...             # SIGTERM (or INT) instead: the graceful stop path

Every call of `point(name)` is a no-op unless GENOME_FAULT_POINT names that point; then the count-th call (counted
per process, from 1) sends SIGKILL to the process itself: no handler, no `finally`, no atexit runs, exactly like an
out-of-memory kill or a pulled plug. `GENOME_FAULT_TRACE=FILE` appends each point's name to FILE as it is reached,
so a test can list the points of an uninterrupted run and choose where to kill (tests/reliability). With a third
field (TERM, INT) the process sends itself that signal instead, at exactly that point, and carries on: its handler
decides (genome_jax.stopping).

The points sit in the windows where a kill could lose or tear work: between writing a temp file and renaming it,
between an asynchronous checkpoint save and its commit, between scoring and recording. Imports nothing of ours.
"""
from __future__ import annotations

import os
import signal
from typing import Callable

ENV = "GENOME_FAULT_POINT"
TRACE_ENV = "GENOME_FAULT_TRACE"

_counts: dict[str, int] = {}


def _target() -> tuple[str, int, int] | None:
    """(point name, count, signal number) of GENOME_FAULT_POINT=NAME[:COUNT[:SIGNAL]], or None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    count, _, sig = rest.partition(":")
    try:
        n = int(count) if count else 1
        signum = int(getattr(signal, "SIG" + sig.strip().upper().removeprefix("SIG"))) if sig else int(signal.SIGKILL)
    except (ValueError, AttributeError):
        raise ValueError(f"{ENV}={spec!r}: expected NAME, NAME:COUNT or NAME:COUNT:SIGNAL (KILL, TERM, INT)") from None
    return name.strip(), n, signum


def point(name: str, before_kill: Callable[[], object] | None = None) -> None:
    """Mark a fault point. `before_kill` runs first when this call is the one that kills (e.g. wait for an
    asynchronous write to commit, to kill exactly after it)."""
    trace = os.environ.get(TRACE_ENV)
    target = _target()
    if not trace and target is None:
        return  # the normal case: two environment lookups
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
    if target is None or target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == target[1]:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), target[2])
