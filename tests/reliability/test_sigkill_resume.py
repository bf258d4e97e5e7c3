"""The whole `genome run` killed with SIGKILL at seeded points spread over saving, exporting and scoring, resumed by
re-running the same command: it must end exactly like an uninterrupted run (final state bit for bit, best adapter
bytes, one metrics record per generation) and leave no temp file behind.

The kills come from genome_jax.faults: GENOME_FAULT_POINT=NAME:COUNT makes the process SIGKILL itself the COUNT-th
time it passes the point NAME. The points are the windows where a kill could tear or lose work (a temp file written
but not yet renamed, an asynchronous checkpoint in flight or just committed, a generation scored but not recorded,
an old best adapter moved aside but the new one not yet in place). An uninterrupted run records the points it passes
(GENOME_FAULT_TRACE); COUNT is drawn from that trace with a fixed seed, so every kill lands on a point that is
really reached, and each chain asserts that its process did die by SIGKILL.

The synthetic fitness (TEST PROBLEM, no LLM) is deterministic, so any difference is a resume defect. The chains run
two at a time (subprocesses) to keep CI short.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import signal
from pathlib import Path

import pytest

from rel_helpers import (SYNTHETIC, SYNTHETIC_PLUS, assert_same_outcome, assert_visible_files_whole, describe,
                         genome, orphans)

SEED = 20240607
RAND = "rand"  # count drawn from the uninterrupted run's trace
SAVING = {"run_config_temp_written", "json_temp_written", "checkpoint_in_flight", "checkpoint_committed",
          "metrics_appended", "metrics_temp_written"}
EXPORTING = {"adapter_temp_written", "adapter_old_moved", "best_exported", "plot_temp_written"}
SCORING = {"scored"}

# chain id -> (method, [(point, count), ...]): each fault kills one process; the next process resumes the folder.
CHAINS: dict[str, tuple[str, list[tuple[str, object]]]] = {
    "run-config-temp": ("genome", [("run_config_temp_written", RAND)]),
    "scored": ("genome", [("scored", RAND)]),
    "json-temp": ("genome", [("json_temp_written", RAND)]),
    "checkpoint-in-flight": ("genome", [("checkpoint_in_flight", RAND)]),
    "checkpoint-committed": ("genome", [("checkpoint_committed", RAND)]),
    "metrics-appended": ("genome", [("metrics_appended", RAND)]),
    "adapter-temp": ("genome", [("adapter_temp_written", RAND)]),
    "best-exported": ("genome", [("best_exported", RAND)]),
    "plot-temp": ("genome", [("plot_temp_written", RAND)]),
    # points only a resumed process passes: cutting metrics back, replacing an existing best adapter
    "resume-truncating-metrics": ("genome", [("checkpoint_committed", RAND), ("metrics_temp_written", 1)]),
    "resume-replacing-best": ("genome", [("best_exported", 1), ("adapter_old_moved", 1)]),
    "three-kills": ("genome", [("scored", RAND), ("checkpoint_in_flight", 1), ("json_temp_written", 1)]),
    "genome-plus": ("genome_plus", [("checkpoint_committed", RAND), ("scored", 1)]),
}
ARGS = {"genome": SYNTHETIC, "genome_plus": SYNTHETIC_PLUS}


def _jobs() -> int:
    return max(1, int(os.environ.get("GENOME_RELIABILITY_JOBS", min(2, os.cpu_count() or 1))))


def _run_chain(name: str, root: Path, traces: dict[str, list[str]]) -> dict:
    method, faults = CHAINS[name]
    rng = random.Random(f"{SEED}:{name}")
    out = root / name
    steps = []
    for point, count in faults:
        if count == RAND:
            seen = collections.Counter(traces[method])[point]
            count = rng.randint(1, seen) if seen else 1  # an unseen point fails below: the process is not killed
        p = genome([*ARGS[method], "--output_dir", out], env={"GENOME_FAULT_POINT": f"{point}:{count}"})
        steps.append({"point": point, "count": count, "proc": p, "orphans": orphans(out) if out.exists() else [],
                      "whole": _whole(out)})
        if p.returncode != -signal.SIGKILL:
            break
    final = genome([*ARGS[method], "--output_dir", out])
    return {"out": out, "steps": steps, "final": final}


def _whole(out: Path) -> str | None:
    try:
        if out.exists():
            assert_visible_files_whole(out)
        return None
    except Exception as e:  # reported by the test
        return f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def chains(tmp_path_factory, synthetic_reference):
    root = tmp_path_factory.mktemp("sigkill")
    refs, traces = {}, {}
    for method in ARGS:
        refs[method], traces[method] = synthetic_reference(method)
    with concurrent.futures.ThreadPoolExecutor(_jobs()) as pool:
        futures = {name: pool.submit(_run_chain, name, root, traces) for name in CHAINS}
        results = {name: f.result() for name, f in futures.items()}
    return refs, traces, results


def test_fault_points_cover_saving_exporting_and_scoring(chains):
    _, traces, _ = chains
    seen = set(traces["genome"])
    fresh = {p for _, faults in CHAINS.values() for p, c in faults if c == RAND}
    assert fresh <= seen, f"fault points no longer reached by a run: {sorted(fresh - seen)}"
    points = {p for _, faults in CHAINS.values() for p, _ in faults}
    assert points == SAVING | EXPORTING | SCORING
    assert sum(len(f) for _, f in CHAINS.values()) >= 10
    # the windows are real: some kills do leave temp files behind (which the resumed runs must remove)
    left = [s["point"] for r in chains[2].values() for s in r["steps"] if s["orphans"]]
    assert {"json_temp_written", "adapter_temp_written", "plot_temp_written"} <= set(left), left


def test_fault_points_are_inert_unless_asked(tmp_path, monkeypatch):
    from genome_jax import faults

    for k in (faults.ENV, faults.TRACE_ENV):
        monkeypatch.delenv(k, raising=False)
    faults.point("scored")  # unset: nothing happens (we are still alive)
    trace = tmp_path / "trace"
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    monkeypatch.setenv(faults.ENV, "some_other_point:1")
    faults.point("scored")
    faults.point("exported")
    assert trace.read_text().split() == ["scored", "exported"]


@pytest.mark.parametrize("name", list(CHAINS))
def test_killed_and_resumed_run_equals_uninterrupted(chains, name):
    refs, _, results = chains
    method, _ = CHAINS[name]
    r = results[name]
    for s in r["steps"]:
        assert s["proc"].returncode == -signal.SIGKILL, (
            f"{s['point']}:{s['count']} did not kill the run\n{describe(s['proc'])}")
        assert s["whole"] is None, f"after the kill at {s['point']}:{s['count']}: {s['whole']}"
    assert r["final"].returncode == 0, describe(r["final"])
    assert "Traceback" not in r["final"].stderr
    assert_same_outcome(refs[method], r["out"])
    assert orphans(r["out"]) == [], "temp files left after the resumed run ended"
