"""`genome demo`: the printed table and timings, flag checks, and (slow) the real thing at a tiny size."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scripts import cli, demo

RESULT = {
    "method": "genome_plus", "generations": 3,
    "best": {"dev_fitness": 0.61, "test_fitness": 0.6, "test_scores": {"arc_e": 0.6}},
    "best_initial_expert": {"name": "openbookqa", "dev_fitness": 0.58, "test_fitness": 0.5,
                            "test_scores": {"arc_e": 0.5}},
    "ensembles": [{"k": 1, "test_fitness": 0.6, "test_scores": {"arc_e": 0.6}},
                  {"k": 2, "test_fitness": 0.575, "test_scores": {"arc_e": 0.575}}],
    "baselines": {"base": 0.54, "uniform_merge": 0.56, "chance": 0.25, "n": 200},
    "n_test": {"arc_e": 200},
    "timings_s": {"load": 0.5, "evaluator_start": 40.0,
                  "evolution": {"operators": 12.0, "export": 1.0, "scoring": 150.0, "checkpoint": 0.5, "total": 170.0},
                  "final": {"export": 0.5, "scoring": 60.0, "total": 65.0}, "total": 280.0},
}


def test_table_rows_standard_errors_and_verdict():
    table = demo.demo_table(RESULT, "arc_e", None).splitlines()
    assert "dev %" in table[0] and "test %" in table[0] and "SE" in table[0]
    se = lambda p: f"{100 * math.sqrt(p * (1 - p) / 200):.1f}"  # binomial SE in points, computed here
    assert "base model" in table[1] and table[1].split()[-3:] == ["-", "54.0", se(0.54)]
    assert "uniform merge" in table[2] and table[2].split()[-2:] == ["56.0", se(0.56)]
    assert "best initial expert (openbookqa)" in table[3] and table[3].split()[-3:] == ["58.0", "50.0", se(0.5)]
    assert "evolved best" in table[4] and table[4].split()[-3:] == ["61.0", "60.0", se(0.6)]
    assert "top 1" in table[5] and table[6].split()[-2] == "57.5"
    assert "chance level 25.0%" in table[7]
    # +10 points vs the expert: 2 SE of the difference = 2 * sqrt(.5*.5/200 + .6*.4/200) = 9.9 points -> beyond;
    # +6 vs the base model: 2 SE = 9.9 -> within
    two_se = 200 * math.sqrt(0.25 / 200 + 0.24 / 200)
    assert f"+10.0 points vs the best initial expert (beyond noise: 2 SE = {two_se:.1f})" in table[8]
    assert "+6.0 points vs the base model (within noise" in table[8]


def test_verdict_flips_with_the_sample_size():
    small = {**RESULT, "n_test": {"arc_e": 100}}  # same gain, twice the variance: within noise
    assert "vs the best initial expert (within noise" in demo.verdict(small, "arc_e")


def test_timing_line_names_every_part():
    line = demo.timing_lines(RESULT, {"model": 0.2, "experts": 0.4, "baselines": 30.0, "total": 300.0})
    for part in ("model 0.2s", "experts 0.4s", "evaluator start 40.0s", "evolution (3 generations) 170.0s",
                 "scoring 150.0s", "test split + ensembles 65.0s", "baselines 30.0s", "total 300.0s"):
        assert part in line


def test_uniform_merge_is_the_mean_delta_w(tmp_path):
    """The exported merge's ΔW = B A equals the mean of the experts' ΔW (numpy), exactly (rank E·r)."""
    from genome_jax.population import Population, PopulationMeta, export_population, load_population

    rng = np.random.RandomState(0)
    mods = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
    factors = {m: {"A": rng.randn(3, 2, 16).astype(np.float32), "B": rng.randn(3, 8, 2).astype(np.float32)}
               for m in mods}
    pop = Population(factors=factors, meta=PopulationMeta(base_model="tiny", target_modules=("q_proj", "v_proj"),
                                                          rank=2, names=("a", "b", "c")))
    export_population(pop, tmp_path / "pool")
    merged = load_population([demo.uniform_merge(tmp_path / "pool", tmp_path / "merged")])
    assert merged.meta.rank == 6
    for m in mods:
        want = np.mean([factors[m]["B"][i] @ factors[m]["A"][i] for i in range(3)], axis=0)
        got = np.asarray(merged.factors[m]["B"][0]) @ np.asarray(merged.factors[m]["A"][0])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--generations", "0"], "--generations must be at least 1"),
    (["--n_dev", "x"], "invalid int value: 'x'"),
])
def test_bad_demo_flags_exit_1(argv, message, capsys):
    try:
        rc = cli.main(["demo", *argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    """The real demo path (model, cached expert pool, vLLM, GENOME+, test table) at a tiny size, on the smoke pool
    (2 experts x 3 steps) so that a fresh machine trains it in a couple of minutes."""
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--output_dir", str(out), "--pool", "smoke", "--generations", "1", "--population_size", "2",
                   "--max_population_size", "3", "--n_dev", "8", "--n_test", "8", "--ensemble_k", "2", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "GENOME+ evolved best" in printed and "ensemble of top 2" in printed and "time: model" in printed
    assert "base model" in printed and "uniform merge" in printed and "chance level" in printed
    assert (out / "demo.png").is_file()
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "genome_plus" and result["n_test"] == {"arc_e": 8}
    assert set(result["baselines"]) == {"base", "uniform_merge", "chance", "n"} and result["baselines"]["n"] == 8
    assert (out / "best_adapter" / "adapter_model.safetensors").is_file()
