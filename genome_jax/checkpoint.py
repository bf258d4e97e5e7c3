"""Checkpoints of the strategy state, through orbax-checkpoint (the only module that imports orbax: its API churns).

Layout of a checkpoint directory:

    run_config.json          the run's identity; a resume under a different config is refused (UserError)
    <step>/state/...         the strategy state (orbax StandardSave of the flax.struct pytree)
    <step>/meta/...          {"step", "checksums": {leaf path: crc32}, "extra": ...} (orbax JsonSave)

`RunCheckpointer` saves one step per generation (asynchronously: the arrays are copied to host, the write runs in
the background and the next save or `close()` waits for it), keeps the last `keep` steps, and cleans orbax's temporary
directories left by a killed process when it opens. orbax finalises a step by renaming its temporary directory, so a
step either exists completely or not at all; a step that exists but does not restore (a truncated or damaged file)
or whose arrays do not match their recorded checksums is skipped with a logged warning, and the previous step is
used (`restore_latest`). The writer also deletes such bad steps so the resumed run can save over them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from genome_jax.errors import UserError

log = logging.getLogger(__name__)

CONFIG_NAME = "run_config.json"
_ITEMS = ("state", "meta")
# The layout of the strategy states this version writes (recorded in run_config.json as "state_format"; a folder
# without it holds format 1: states with their key and fitness history inside). Bump it when a state's fields change.
STATE_FORMAT = 2
FORMAT_KEY = "state_format"

__all__ = ["CONFIG_NAME", "STATE_FORMAT", "Restored", "RunCheckpointer", "restore_latest", "state_checksums", "config_differences"]


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    meta: dict
    skipped: tuple[int, ...] = ()  # newer steps that were unreadable or corrupt


# ---- checksums ----

def state_checksums(state) -> dict[str, int]:
    """{leaf path: crc32 of dtype, shape and bytes} for every array leaf of a pytree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        crc = zlib.crc32(f"{a.dtype.str}{a.shape}".encode())
        out[jax.tree_util.keystr(path)] = zlib.crc32(memoryview(a).cast("B"), crc) if a.size else crc
    return out


def _check_like(restored, target) -> None:
    """Raise ValueError if the restored pytree's structure, shapes or dtypes differ from the target's."""
    r_leaves, r_def = jax.tree_util.tree_flatten(restored)
    t_leaves, t_def = jax.tree_util.tree_flatten(target)
    if r_def != t_def:
        raise ValueError("state structure differs from the expected one")
    for a, b in zip(r_leaves, t_leaves):
        (sa, da), (sb, db) = _shape_dtype(a), _shape_dtype(b)
        if sa != sb or da != db:
            raise ValueError(f"array {sa} {da} where {sb} {db} expected")


def _shape_dtype(x) -> tuple[tuple, np.dtype]:
    # arrays and jax.ShapeDtypeStruct targets (an abstract, sharded restore target: genome_jax.sharding.abstract_tree)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype)
    return np.shape(x), np.asarray(x).dtype


# ---- run config ----

def _normalise(config: Mapping[str, Any]) -> dict:
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except TypeError as e:
        raise UserError(f"run config is not JSON-serialisable: {e}") from None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: d}
    return {prefix[:-1]: d}


def config_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key: saved -> wanted' strings (sorted; missing keys shown as <absent>)."""
    a, b = _flatten(_normalise(saved)), _flatten(_normalise(wanted))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
    return out


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---- storage errors ----

_STORAGE = ("No space left on device", "Disk quota exceeded", "File too large")


@contextlib.contextmanager
def _storage_errors(directory: Path):
    """A full disk (or quota, or file size limit) while orbax writes: one UserError line instead of its nested
    tensorstore message. orbax never finalises a step it could not write, so the steps saved before stay intact."""
    try:
        yield
    except Exception as e:
        cause = next((c for c in _STORAGE if c in str(e)), None)
        if cause is None:
            raise
        raise UserError(f"{directory}: cannot write a checkpoint: {cause}; the steps saved before are intact: "
                        "free some space and rerun the same command to resume") from None


def _quiet_closed_loop_noise() -> None:
    """A failed restore leaves orbax/tensorstore reads in flight; when they finish, orbax's event loop is already
    closed, and they report `RuntimeError: Event loop is closed`, or their coroutine dies with the read error, as
    unraisable exceptions (bare tracebacks on stderr). That is noise after the fallback warning: drop it, only it."""
    prev = sys.unraisablehook
    if getattr(prev, "_genome_quiet", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
            return
        code = getattr(u.object, "cr_code", None)  # an orbax coroutine garbage-collected with its read error
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        prev(u)

    hook._genome_quiet = True
    sys.unraisablehook = hook


class _DropStorageErrors(logging.Filter):
    """orbax logs a failed asynchronous write (full disk) as an ERROR with a traceback before it re-raises; we turn
    that failure into one UserError line ourselves, so the log record is a duplicate: drop it, only it."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(c in msg for c in _STORAGE)


def _quiet_storage_logs() -> None:
    log = logging.getLogger("absl")
    if not any(isinstance(f, _DropStorageErrors) for f in log.filters):
        log.addFilter(_DropStorageErrors())


# ---- orbax ----

def _remove_orbax_temps(directory: Path) -> None:
    """Delete the `<step>.orbax-checkpoint-tmp*` folders a killed save left, now and in this thread. orbax would
    also clean them, but in a background thread racing with the first save of the resumed run (which may write the
    same step again): that race failed a resume with `Directory not empty: 'state.orbax-checkpoint-tmp'`. The
    caller owns the folder (one writer per run folder: genome_jax.run_lock)."""
    for p in directory.glob("*.orbax-checkpoint-tmp*"):
        for _ in range(3):  # a file system slow to forget deleted entries: try again (then orbax tries too)
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                break


def _manager(directory: Path, *, keep: int, async_save: bool, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        cleanup_tmp_directories=not read_only,  # a killed save leaves <step>.orbax-checkpoint-tmp*
        enable_async_checkpointing=async_save,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)


def _restore_with_fallback(mgr: ocp.CheckpointManager, directory: Path, target) -> Restored | None:
    mgr.reload()
    steps = sorted(mgr.all_steps(), reverse=True)
    bad: list[int] = []
    errors: list[str] = []
    for step in steps:
        try:
            r = mgr.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
            )
            state, meta = r["state"], r["meta"]
            _check_like(state, target)
            want = (meta or {}).get("checksums")
            if want is None:
                raise ValueError("no checksums recorded")
            got = state_checksums(state)
            wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            if wrong:
                raise ValueError(f"checksum mismatch in {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        except Exception as e:  # any failure to read a step means: try the one before it
            _quiet_closed_loop_noise()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            msg = f"{type(e).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"  # tensorstore errors are long
            log.warning("checkpoint step %d in %s is corrupt or incomplete (%s); falling back to an earlier step",
                        step, directory, msg)
            bad.append(step)
            errors.append(f"step {step}: {msg}")
            continue
        if bad:
            log.warning("resuming %s from step %d instead of the latest step %d", directory, step, bad[0])
        return Restored(step=int(step), state=state, meta=dict(meta), skipped=tuple(bad))
    if steps:
        raise UserError(f"{directory}: no readable checkpoint ({'; '.join(errors)})")
    return None


def restore_latest(directory, target_state) -> Restored | None:
    """Restore the newest complete, intact step of `directory` into the structure of `target_state`.

    Falls back to the previous step (with a logged warning) when the newest is unreadable or fails its checksums.
    Returns None when the directory holds no step; raises UserError when steps exist but none is readable.
    Read-only: nothing is deleted (`RunCheckpointer.restore_latest` also removes the bad steps).
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return None
    mgr = _manager(directory, keep=1, async_save=False, read_only=True)
    try:
        return _restore_with_fallback(mgr, directory, target_state)
    finally:
        mgr.close()


class RunCheckpointer:
    """Per-generation checkpoints of one run's strategy state, with its run config checked on resume.

        with RunCheckpointer(out / "checkpoints", config) as ckpt:
            restored = ckpt.restore_latest(template_state)      # None on a fresh run
            ...
            ckpt.save(generation, state)

    config: a JSON-able mapping that identifies the run (what must match for a resume to be valid). If the
    directory already holds checkpoints written under a different config, opening raises UserError naming the
    differing keys; if it holds checkpoints and no config, it is refused as well, and so are checkpoints of another
    STATE_FORMAT (one line naming it).
    """

    def __init__(self, directory, config: Mapping[str, Any], *, keep: int = 3, async_save: bool = True):
        if keep < 2:
            raise UserError("checkpoints: keep at least 2 steps (the previous one is the fallback for a damaged latest)")
        self.directory = Path(directory).absolute()
        self.config = {**_normalise(config), FORMAT_KEY: STATE_FORMAT}
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(f".{CONFIG_NAME}.tmp*"):
            leftover.unlink(missing_ok=True)
        _remove_orbax_temps(self.directory)
        _quiet_closed_loop_noise()  # a save aborted by a full disk leaves the same in-flight noise as a bad restore
        _quiet_storage_logs()
        self._mgr = _manager(self.directory, keep=keep, async_save=async_save)
        try:
            self._check_config()
        except BaseException:
            self._mgr.close()
            raise

    # -- config --
    def _check_config(self) -> None:
        path = self.directory / CONFIG_NAME
        has_steps = bool(self._mgr.all_steps())
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: unreadable run config ({e})") from None
            found = saved.get(FORMAT_KEY, 1) if isinstance(saved, dict) else 1
            if has_steps and found != STATE_FORMAT:
                raise UserError(f"{self.directory} holds checkpoints in state format {found}; this version reads "
                                f"format {STATE_FORMAT} only: start the run again in another output directory")
            diffs = config_differences(saved, self.config)
            if diffs and has_steps:
                raise UserError(
                    f"{self.directory} holds checkpoints of a different run config (differing keys: "
                    f"{'; '.join(diffs)}); use another output directory or the same settings"
                )
            if not diffs:
                return
        elif has_steps:
            raise UserError(f"{self.directory} holds checkpoints but no {CONFIG_NAME}; refusing to resume an unknown run")
        _write_json_atomic(path, self.config)  # fresh directory (or one that never completed a step)

    # -- steps --
    @property
    def steps(self) -> list[int]:
        with _storage_errors(self.directory):
            self._mgr.wait_until_finished()
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        s = self.steps
        return s[-1] if s else None

    def save(self, step: int, state, extra: Mapping[str, Any] | None = None) -> None:
        """Save `state` as `step` (asynchronous; returns once the arrays are on host)."""
        meta = {"step": int(step), "checksums": state_checksums(state), "extra": _normalise(extra or {})}
        with _storage_errors(self.directory):  # raised here when the previous (asynchronous) save failed
            self._mgr.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    def restore_latest(self, target_state) -> Restored | None:
        """Like the module-level `restore_latest`, and deletes the bad newer steps so saving can go on."""
        self._mgr.wait_until_finished()
        r = _restore_with_fallback(self._mgr, self.directory, target_state)
        if r is not None and r.skipped:
            for step in r.skipped:
                try:
                    self._mgr.delete(step)
                except Exception:  # a damaged step may not even delete cleanly through orbax
                    shutil.rmtree(self.directory / str(step), ignore_errors=True)
            self._mgr.reload()
        return r

    def wait(self) -> None:
        """Block until the in-flight save is on disk."""
        with _storage_errors(self.directory):
            self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for the in-flight save, then release orbax's threads."""
        try:
            with _storage_errors(self.directory):
                self._mgr.wait_until_finished()
        finally:
            self._mgr.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
