"""A seeded sweep of SIGTERM and SIGKILL points over saving, exporting and scoring: each point stops one `genome run`
of the synthetic TEST PROBLEM, and the FIRST re-run of the same command must succeed and end bit for bit like the
uninterrupted run (final state, best adapter bytes, one metrics record per generation), with no temp file left.

The signals come from genome_jax.faults (GENOME_FAULT_POINT=NAME:COUNT:TERM|KILL): the process sends the signal to
itself the COUNT-th time it passes the point NAME, so each lands exactly in its phase (a temp file written but not
renamed, an asynchronous checkpoint in flight or just committed, a generation scored but not recorded, ...). The
points are drawn with a fixed seed from the trace of an uninterrupted run (every one is really reached).
- SIGTERM: the graceful stop; exit 143 with exactly one line on stderr, `genome: stopped by SIGTERM after
  generation N; re-run the same command to resume`, N being the last complete checkpoint.
- SIGKILL: nothing runs (no handler, no finally): the leftovers are whatever the phase leaves (orbax's
  `N.orbax-checkpoint-tmp`, `.NAME.tmp*`, a half-replaced best adapter, the lock file of a dead process).
Cost: 2 processes per point, two at a time, sharing one JAX compilation cache (no process recompiles).
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import signal
import time
from pathlib import Path

import pytest

from rel_helpers import SYNTHETIC, assert_same_outcome, describe, genome, orphans

# 80 processes: about 5 minutes on an idle 2-core machine, much more on a busy one (pytest-timeout is 900 s per test)
pytestmark = pytest.mark.timeout(3600)

SEED = 15
N_POINTS = 20  # per signal
GROUPS = {
    "saving": {"run_config_temp_written", "json_temp_written", "checkpoint_in_flight", "checkpoint_committed",
               "metrics_appended", "metrics_temp_written"},
    "exporting": {"adapter_temp_written", "adapter_old_moved", "best_exported", "plot_temp_written", "exported"},
    "scoring": {"scored"},
}
SIGNALS = ("TERM", "KILL")


def _group(point: str) -> str:
    return next(g for g, names in GROUPS.items() if point in names)


def draw_points(trace: list[str], n: int, seed: str) -> list[tuple[str, int]]:
    """n distinct (point, count) pairs of an uninterrupted run's trace: every exporting and scoring pass (they are
    few), the rest drawn from the saving passes; seeded, in trace order."""
    seen: collections.Counter = collections.Counter()
    passes = []
    for name in trace:
        seen[name] += 1
        passes.append((name, seen[name]))
    must = [p for p in passes if _group(p[0]) != "saving"]
    rest = [p for p in passes if _group(p[0]) == "saving"]
    chosen = set(must[:n]) | set(random.Random(seed).sample(rest, max(0, min(len(rest), n - len(must)))))
    return [p for p in passes if p in chosen]


def _jobs() -> int:
    return max(1, int(os.environ.get("GENOME_RELIABILITY_JOBS", min(2, os.cpu_count() or 1))))


def _saved_steps(out: Path) -> list[int]:
    ck = out / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


def _one(sig: str, point: str, count: int, root: Path, env: dict) -> dict:
    out = root / f"{sig}-{point}-{count}"
    args = [*SYNTHETIC, "--output_dir", out]
    stopped = genome(args, env={**env, "GENOME_FAULT_POINT": f"{point}:{count}:{sig}"})
    left = {"steps": _saved_steps(out), "orphans": orphans(out) if out.exists() else [],
            "lock_file": (out / ".genome-run.lock").exists()}
    first = genome(args, env=env)  # the first resume: must succeed
    return {"out": out, "stopped": stopped, "left": left, "first": first}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synthetic_reference):
    ref, trace = synthetic_reference("genome")
    root = tmp_path_factory.mktemp("signal-sweep")
    env = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    points = {sig: draw_points(trace, N_POINTS, f"{SEED}:{sig}") for sig in SIGNALS}
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(_jobs()) as pool:
        futures = {(sig, p, c): pool.submit(_one, sig, p, c, root, env) for sig in SIGNALS for p, c in points[sig]}
        results = {k: f.result() for k, f in futures.items()}
    wall = time.perf_counter() - t0
    return ref, trace, points, results, wall


def test_sweep_covers_saving_exporting_and_scoring(sweep):
    _, trace, points, results, wall = sweep
    for sig in SIGNALS:
        assert len(points[sig]) >= 20, (sig, len(points[sig]))
        assert {_group(p) for p, _ in points[sig]} == set(GROUPS), points[sig]
    ok = sum(r["first"].returncode == 0 for r in results.values())
    left = sum(bool(r["left"]["orphans"]) for r in results.values())
    print(f"\nsignal sweep: {len(points['TERM'])} SIGTERM + {len(points['KILL'])} SIGKILL points, "
          f"{ok}/{len(results)} first resumes succeeded, {left} stops left temp files behind, {wall:.0f}s")
    # the windows are real: SIGKILLs leave temp files (orbax's among them) and the dead run's lock file
    kill_left = [x for (sig, _, _), r in results.items() if sig == "KILL" for x in r["left"]["orphans"]]
    assert any("orbax-checkpoint-tmp" in x for x in kill_left), kill_left
    assert all(r["left"]["lock_file"] for (sig, _, _), r in results.items() if sig == "KILL" and r["left"]["steps"])


def _ids():
    # the parametrisation is fixed at collection: one id per (signal, slot); the fixture maps slots to points
    return [f"{sig}-{i:02d}" for sig in SIGNALS for i in range(N_POINTS)]


@pytest.mark.parametrize("slot", _ids())
def test_first_resume_after_the_signal_equals_uninterrupted(sweep, slot):
    ref, _, points, results, _ = sweep
    sig, i = slot.split("-")
    point, count = points[sig][int(i)]
    r = results[(sig, point, count)]
    where = f"{point}:{count}:{sig}"
    p = r["stopped"]
    if sig == "KILL":
        assert p.returncode == -signal.SIGKILL, f"{where} did not kill the run\n{describe(p)}"
    else:
        assert p.returncode == 143, f"{where}: {describe(p)}"
        steps = r["left"]["steps"]
        after = f"after generation {steps[-1]}" if steps else "before generation 0 was saved"
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines == [f"genome: stopped by SIGTERM {after}; re-run the same command to resume"], \
            f"{where}: {describe(p)}"
        # a graceful stop finishes the save in flight: no orbax temp folder is ever left
        assert not any("orbax-checkpoint-tmp" in x for x in r["left"]["orphans"]), (where, r["left"])
    f = r["first"]
    assert f.returncode == 0, f"first resume after {where} failed\n{describe(f)}"
    assert "Traceback" not in f.stderr and "internal error" not in f.stderr, describe(f)
    assert_same_outcome(ref, r["out"])
    assert orphans(r["out"]) == [], f"temp files left after the resumed run ({where})"
