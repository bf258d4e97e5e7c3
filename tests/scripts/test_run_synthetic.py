"""`genome run --tasks synthetic` end to end (the TEST PROBLEM, no LLM): reports, resume after SIGKILL, refusals.

The synthetic fitness is deterministic, so a killed-and-resumed run must end bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scripts import cli

REPO = Path(__file__).resolve().parents[2]
# small and quick: 4 random experts (2 layers, d=32, rank 4), populations of 4-6; linear merges (the hidden target
# is a linear mix of the experts)
BASE = ["--tasks", "synthetic", "--population_size", "5", "--cross_method", "linear", "--combine_method", "linear",
        "--individual_mutation_rate", "0.8",
        "--gene_mutation_rate", "0.3", "--sigma", "0.05", "--elite_percent", "0.2", "--seed", "7", "--quiet"]


def _main(argv: list[str], capsys=None) -> int:
    rc = cli.main(["run", *argv])
    if capsys is not None:
        capsys.readouterr()
    return rc


def _final_state(out: Path):
    """The last checkpointed strategy state of a run folder, restored through genome_jax.checkpoint."""
    from scripts.run_loop import saved_state

    return saved_state(out)


def _leaves(state):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def _fitness_columns(out: Path):
    return [(r["generation"], r["best"], r["mean"], r["worst"], r["best_ever"])
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 12-generation GENOME run (reference for the tests below)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    assert _main([*BASE, "--max_iter", "12", "--output_dir", str(out)]) == 0
    return out


def test_run_writes_every_report(finished_run):
    out = finished_run
    for name in ("run_config.json", "metrics.jsonl", "result.json", "fitness.png", "experts.json",
                 "best_adapter/adapter_config.json", "best_adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in recs] == list(range(13))
    for r in recs:
        assert r["worst"] <= r["mean"] <= r["best"] <= r["best_ever"] + 1e-12
        assert set(r["time"]) <= {"operators", "export", "scoring", "checkpoint", "load", "evaluator_start"}
    best_ever = [r["best_ever"] for r in recs]
    assert best_ever == sorted(best_ever)  # elitism: the best never gets worse
    assert best_ever[-1] > best_ever[0]  # and the search does improve on the synthetic problem
    result = json.loads((out / "result.json").read_text())
    assert result["generations"] == 12 and result["stopped_early"] is False and result["test"] is None
    assert result["best"]["dev_fitness"] == pytest.approx(best_ever[-1], abs=1e-6)
    assert "TEST PROBLEM" in result["problem"]
    t = result["timings_s"]
    assert set(t) == {"load", "evaluator_start", "evolution", "final", "total"}
    assert set(t["evolution"]) >= {"operators", "scoring", "checkpoint", "total"}
    assert sum(v for k, v in t["evolution"].items() if k != "total") <= t["evolution"]["total"] + 1e-3
    assert t["evolution"]["total"] + t["final"]["total"] <= t["total"] + 1e-3
    png = (out / "fitness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_metrics_agree_with_the_checkpointed_state(finished_run):
    restored = _final_state(finished_run)
    assert restored.step == 12
    f = np.asarray(restored.state.fitness, np.float64)
    last = _fitness_columns(finished_run)[-1]
    assert last[0] == 12
    np.testing.assert_allclose(last[1:4], [f.max(), f.mean(), f.min()], rtol=1e-6)
    assert last[4] == pytest.approx(float(restored.state.best_fitness), abs=1e-7)


def test_best_adapter_scores_what_the_run_reported(finished_run):
    """Independent path: read best_adapter/ back as PEFT and score it with the synthetic fitness."""
    from genome_jax import synthetic
    from genome_jax.population import load_population

    best = load_population(finished_run / "best_adapter")
    problem = synthetic.make_problem(synthetic.synthetic_experts(7), seed=8)
    # the export trims zero rank padding; pad back to the experts' rank to score
    r = next(iter(problem.experts.values()))["A"].shape[1]
    factors = {m: {"A": np.pad(np.asarray(v["A"]), ((0, 0), (0, r - v["A"].shape[1]), (0, 0))),
                   "B": np.pad(np.asarray(v["B"]), ((0, 0), (0, 0), (0, r - v["B"].shape[2])))}
               for m, v in best.factors.items()}
    score = float(synthetic.score(problem, factors)[0])
    reported = json.loads((finished_run / "result.json").read_text())["best"]["dev_fitness"]
    assert score == pytest.approx(reported, abs=1e-5)


def test_cli_equals_the_strategy_driver(finished_run, tmp_path):
    """Flags -> (strategy, params) -> evolve through `genome run` gives the same final state as
    genome_jax.synthetic.run_synthetic driving the same strategy directly."""
    from genome_jax.run_config import run_config_from_dict
    from genome_jax.strategies import strategy_params
    from genome_jax.synthetic import run_synthetic

    cfg = run_config_from_dict(json.loads((finished_run / "run_config.json").read_text()), "saved")
    strategy, params = strategy_params(cfg)
    ref = run_synthetic(tmp_path / "driver", strategy, params, seed=7, generations=12)
    mine = _final_state(finished_run).state
    assert float(mine.best_fitness) == float(ref.best_fitness)
    for a, b in zip(_leaves(mine), _leaves(ref.state)):
        np.testing.assert_array_equal(a, b)


def _spawn(out: Path, max_iter: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "scripts.cli", "run", *BASE, "--max_iter", str(max_iter),
                             "--output_dir", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after_lines(proc: subprocess.Popen, out: Path, n_lines: int, timeout: float = 240) -> int:
    """SIGKILL `proc` once metrics.jsonl holds n_lines records; returns the count seen at the kill."""
    path = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill (rc={proc.returncode}): {proc.stderr.read()[-2000:]}")
        seen = len(path.read_text().splitlines()) if path.exists() else 0
        if seen >= n_lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for generations")


def test_resume_after_sigkill_equals_uninterrupted(finished_run, tmp_path):
    out = tmp_path / "b"
    # killed twice at different points, resumed by re-running the very same command
    seen = _kill_after_lines(_spawn(out, 12), out, 3)
    assert seen < 13
    first = _final_state(out)
    assert first is not None and first.step < 12
    seen = _kill_after_lines(_spawn(out, 12), out, 8)
    assert seen < 13
    assert _main([*BASE, "--max_iter", "12", "--output_dir", str(out)]) == 0

    a, b = _final_state(finished_run), _final_state(out)
    assert a.step == b.step == 12
    for x, y in zip(_leaves(a.state), _leaves(b.state)):
        np.testing.assert_array_equal(x, y)
    assert (out / "best_adapter/adapter_model.safetensors").read_bytes() == \
        (finished_run / "best_adapter/adapter_model.safetensors").read_bytes()
    assert _fitness_columns(out) == _fitness_columns(finished_run)  # one line per generation, none duplicated
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (finished_run, out))
    assert ra["best"] == {**rb["best"], "adapter": ra["best"]["adapter"]}
    assert rb["resumed_from"] is not None


def test_rerun_of_a_finished_run_continues_nothing(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    before = _fitness_columns(out)
    assert _main([*BASE, "--max_iter", "12", "--output_dir", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert _fitness_columns(out) == before


def test_other_config_on_existing_run_is_refused(finished_run, capsys):
    listing = sorted((p.relative_to(finished_run), p.stat().st_mtime_ns) for p in finished_run.rglob("*"))
    rc = cli.main(["run", *BASE, "--max_iter", "12", "--sigma", "0.1", "--output_dir", str(finished_run)])
    err = capsys.readouterr().err
    assert rc == 1 and "different config (sigma: 0.05 -> 0.1)" in err
    assert sorted((p.relative_to(finished_run), p.stat().st_mtime_ns) for p in finished_run.rglob("*")) == listing


def test_checkpoints_of_another_run_are_refused_even_with_an_edited_run_config(finished_run, tmp_path, capsys):
    """The checkpoint directory carries its own identity: editing run_config.json cannot mix two runs."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(finished_run, out)
    cfg = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({**cfg, "population_size": 4}))
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    rc = cli.main(["run", *BASE, "--max_iter", "12", "--population_size", "4", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "different run config" in err and "population_size: 5 -> 4" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == steps  # untouched


def test_genome_plus_and_resume_flag(tmp_path, capsys):
    out = tmp_path / "plus"
    argv = [*BASE, "--method", "genome_plus", "--population_size", "4", "--max_population_size", "6",
            "--max_iter", "3", "--output_dir", str(out)]
    assert _main(argv, capsys) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["population"] == 4 and recs[-1]["population"] == 6  # grows to max_population_size
    # --resume DIR reads the saved config; a finished run just reports again
    assert cli.main(["run", "--resume", str(out), "--quiet"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_with_a_larger_max_iter_extends_a_finished_run(finished_run, tmp_path, capsys):
    """max_iter is not part of the identity: a finished 6-generation run, resumed with --max_iter 12, ends exactly
    where the uninterrupted 12-generation run ended (state, metrics lines, best adapter)."""
    out = tmp_path / "short"
    assert _main([*BASE, "--max_iter", "6", "--output_dir", str(out)], capsys) == 0
    assert json.loads((out / "result.json").read_text())["generations"] == 6
    assert cli.main(["run", "--resume", str(out), "--max_iter", "12", "--quiet"]) == 0
    capsys.readouterr()
    a, b = _final_state(finished_run), _final_state(out)
    assert a.step == b.step == 12
    for x, y in zip(_leaves(a.state), _leaves(b.state)):
        np.testing.assert_array_equal(x, y)
    assert _fitness_columns(out) == _fitness_columns(finished_run)
    result = json.loads((out / "result.json").read_text())
    assert result["generations"] == 12 and result["resumed_from"] == 6


def test_checkpoints_of_an_old_state_format_are_refused(finished_run, tmp_path, capsys):
    """Checkpoints written before the state format was recorded (format 1: key and history inside the state)."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(finished_run, out)
    ident = out / "checkpoints" / "run_config.json"
    ident.write_text(json.dumps({k: v for k, v in json.loads(ident.read_text()).items() if k != "state_format"}))
    rc = cli.main(["run", *BASE, "--max_iter", "12", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "state format 1" in err[0] and "format 2" in err[0], err
