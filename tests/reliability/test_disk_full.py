"""Disk full (a small tmpfs filled with ballast; or a file size limit, RLIMIT_FSIZE, where mounting is not allowed)
while `genome run` exports the best adapter, and while it writes a checkpoint: the run stops with one clear line
naming the folder and the cause, every checkpoint and the previous best adapter stay intact, and once space is
free again the same command resumes and ends exactly like a run that never hit the wall."""
from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import numpy as np
import pytest

from rel_helpers import (SYNTHETIC, assert_same_outcome, copy_run, describe, fill, final_state, genome, orphans,
                         state_leaves)


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Two interrupted runs to resume on a full disk:
    'export': every generation checkpointed and the best adapter exported, killed just after (a resume re-exports);
    'checkpoint': killed after generation 1 was checkpointed (a resume must write more checkpoints)."""
    root = tmp_path_factory.mktemp("diskfull")
    runs = {}
    for name, point in (("export", "best_exported:1"), ("checkpoint", "checkpoint_committed:2")):
        out = root / name
        p = genome([*SYNTHETIC, "--output_dir", out], env={"GENOME_FAULT_POINT": point})
        assert p.returncode == -signal.SIGKILL, describe(p)
        runs[name] = out
    return runs


def _check_refused_cleanly(p, run: Path, before: dict, culprit: str, cause: str) -> None:
    assert p.returncode != 0, describe(p)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("genome: error: "), describe(p)
    assert culprit in last and cause in last, last
    assert len(last) < 400, last
    after = _snapshot(run / "checkpoints")
    assert {k: v for k, v in after.items() if k in before} == before, "a saved checkpoint changed"


@pytest.mark.parametrize("how", ["tmpfs", "fsize"])
def test_disk_full_while_exporting(how, killed_runs, synthetic_reference, small_tmpfs, tmp_path):
    ref, _ = synthetic_reference("genome")
    base = killed_runs["export"]
    if how == "tmpfs":
        fs = small_tmpfs(1 << 20)
        run = copy_run(base, fs / "run")
        ballast = fill(fs, leave=4096)  # room for the small report files, not for the adapter's 5 KiB weights
        limit, cause = None, "No space left on device"
    else:
        run = copy_run(base, tmp_path / "run")
        ballast = None
        limit, cause = 4096, "File too large"
    ckpt_before = _snapshot(run / "checkpoints")
    best_before = _snapshot(run / "best_adapter")
    restored_before = final_state(run)

    p = genome([*SYNTHETIC, "--output_dir", run], env={"GENOME_JAX_COMPILE_CACHE": "0"}, max_file_bytes=limit)
    _check_refused_cleanly(p, run, ckpt_before, str(run / "best_adapter"), cause)
    assert "Traceback" not in p.stderr, describe(p)
    assert _snapshot(run / "checkpoints") == ckpt_before
    assert _snapshot(run / "best_adapter") == best_before  # the previous export is still whole
    assert not [o for o in orphans(run) if "best_adapter" in o], "the failed export left a half folder"
    again = final_state(run)
    assert again.step == restored_before.step
    for (k, x), (_, y) in zip(state_leaves(again.state), state_leaves(restored_before.state)):
        assert np.array_equal(x, y, equal_nan=True), k

    if ballast is not None:
        ballast.unlink()
    p = genome([*SYNTHETIC, "--output_dir", run])  # space again: the same command finishes the run
    assert p.returncode == 0, describe(p)
    assert_same_outcome(ref, run)
    assert orphans(run) == []


@pytest.mark.parametrize("how", ["tmpfs", "fsize"])
def test_disk_full_while_checkpointing(how, killed_runs, synthetic_reference, small_tmpfs, tmp_path):
    ref, _ = synthetic_reference("genome")
    base = killed_runs["checkpoint"]
    if how == "tmpfs":
        fs = small_tmpfs(1 << 20)
        run = copy_run(base, fs / "run")
        ballast = fill(fs, leave=8192)  # a checkpoint step takes ~70 KiB
        limit, cause = None, "No space left on device"
    else:
        run = copy_run(base, tmp_path / "run")
        ballast = None
        limit, cause = 4096, "File too large"  # orbax's array files of a step exceed 4 KiB
    steps_before = final_state(run).step
    ckpt_before = _snapshot(run / "checkpoints")

    p = genome([*SYNTHETIC, "--output_dir", run], env={"GENOME_JAX_COMPILE_CACHE": "0"}, max_file_bytes=limit)
    _check_refused_cleanly(p, run, ckpt_before, str(run / "checkpoints"), cause)
    r = final_state(run)
    assert r.step >= steps_before and not r.skipped  # whatever was saved is complete and intact

    if ballast is not None:
        ballast.unlink()
    p = genome([*SYNTHETIC, "--output_dir", run])
    assert p.returncode == 0, describe(p)
    assert_same_outcome(ref, run)
    assert orphans(run) == []
