"""A run folder whose latest checkpoint step is damaged (truncated, bit-flipped, files missing, metadata garbage,
zeroed as after a crash of a file system without data journaling): re-running the same command falls back to the
previous complete step, says so on stderr, redoes the lost generation and ends exactly like an uninterrupted run.
With every step damaged the run refuses with one line and touches nothing."""
from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from rel_helpers import SYNTHETIC, assert_same_outcome, copy_run, describe, genome, orphans


def _array_files(step: Path) -> list[Path]:
    return [p for p in (step / "state").rglob("*") if p.is_file() and "/d/" in str(p.relative_to(step.parent))]


# Every array data file of the step is damaged: a step's arrays may span several data files (how orbax splits them
# varies from run to run), so damaging only the largest could leave a step that still restores (seen once: a
# flaky "every step damaged" run that fell back to an intact step).
def _truncate(step: Path) -> None:
    for f in _array_files(step):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])


def _flip(step: Path) -> None:
    for f in _array_files(step):
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
        f.write_bytes(bytes(data))


def _missing_manifest(step: Path) -> None:
    for m in (step / "state").rglob("manifest.ocdbt"):
        m.unlink()


def _garbage_meta(step: Path) -> None:
    (step / "meta" / "metadata").write_text("{not json")


def _zeroed(step: Path) -> None:
    for p in step.rglob("*"):
        if p.is_file():
            p.write_bytes(b"")


DAMAGE = {"truncated": _truncate, "bit-flipped": _flip, "manifest-missing": _missing_manifest,
          "meta-garbage": _garbage_meta, "zeroed": _zeroed}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run killed just after generation 3 was checkpointed (steps 1, 2, 3 kept)."""
    out = tmp_path_factory.mktemp("corrupt") / "run"
    p = genome([*SYNTHETIC, "--output_dir", out], env={"GENOME_FAULT_POINT": "checkpoint_committed:4"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    steps = sorted(int(s.name) for s in (out / "checkpoints").iterdir() if s.name.isdigit())
    assert steps[-1] == 3 and len(steps) >= 2, steps
    return out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_step_falls_back_to_the_previous_one(damage, interrupted, synthetic_reference, tmp_path):
    ref, _ = synthetic_reference("genome")
    run = copy_run(interrupted, tmp_path / "run")
    DAMAGE[damage](run / "checkpoints" / "3")
    p = genome([*SYNTHETIC, "--output_dir", run])
    assert p.returncode == 0, describe(p)
    assert "checkpoint step 3" in p.stderr and "falling back" in p.stderr, describe(p)
    assert f"resuming {run} from generation 2" in p.stdout, describe(p)
    assert "Traceback" not in p.stderr, describe(p)
    assert_same_outcome(ref, run)
    assert orphans(run) == []


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file's digest, except the run lock (it names the pid of whichever run last held the folder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".genome-run.lock"}


def test_every_step_damaged_is_refused_with_one_line(interrupted, tmp_path):
    run = copy_run(interrupted, tmp_path / "run")
    for step in (run / "checkpoints").iterdir():
        if step.name.isdigit():
            _truncate(step)
    before = _snapshot(run)
    p = genome([*SYNTHETIC, "--output_dir", run])
    assert p.returncode == 1, describe(p)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("genome: error: ") and "no readable checkpoint" in last, describe(p)
    assert "Traceback" not in p.stderr
    assert _snapshot(run) == before  # nothing deleted or rewritten: the user decides what to do with it
