"""`genome demo`: the verdict rule, the uniform merge, flag checks, and (slow) the real thing at a tiny size, whose
printed table and timings are checked against its own result.json, the task file and SEs recomputed here."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from genome_jax.population import Population, PopulationMeta, export_population, load_population
from scripts import cli, demo


def _se_points(p: float, n: int) -> float:
    """Binomial standard error of an accuracy, in points (computed here, not by demo.stderr)."""
    return 100 * math.sqrt(p * (1 - p) / n)


def test_verdict_flips_with_the_sample_size():
    """The same +10 points is beyond noise on 200 items (2 SE = 9.9 points) and within it on 100 (2 SE = 14)."""
    result = {"best": {"test_scores": {"arc_e": 0.6}}, "best_initial_expert": {"test_scores": {"arc_e": 0.5}},
              "n_test": {"arc_e": 200}}
    two_se = 200 * math.sqrt(0.25 / 200 + 0.24 / 200)
    assert f"+10.0 points vs the best initial expert (beyond noise: 2 SE = {two_se:.1f})" in demo.verdict(result, "arc_e")
    small = {**result, "n_test": {"arc_e": 100}}
    assert "vs the best initial expert (within noise" in demo.verdict(small, "arc_e")


def test_uniform_merge_is_the_mean_delta_w(tmp_path):
    """The exported merge's ΔW = B A equals the mean of the experts' ΔW (numpy), exactly (rank E·r)."""
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


def _check_table(printed: str, result: dict, target: str) -> None:
    """Every row of the printed table against result.json, the SE recomputed here, the chance level from the task
    file itself, and the verdict's differences."""
    lines = printed.splitlines()
    head = next(i for i, l in enumerate(lines) if "dev %" in l and "test %" in l)
    n = result["n_test"][target]
    exp, best = result["best_initial_expert"], result["best"]
    want = [("base model", None, result["baselines"]["base"]),
            ("uniform merge", None, result["baselines"]["uniform_merge"]),
            (f"best initial expert ({exp['name']})", exp["dev_fitness"], exp["test_scores"][target]),
            ("GENOME+ evolved best", best["dev_fitness"], best["test_scores"][target])]
    want += [(f"ensemble of top {e['k']}", None, e["test_scores"][target]) for e in result["ensembles"]]
    for row, (label, dev, test) in zip(lines[head + 1:], want):
        cells = row.split()
        assert label in row
        assert cells[-3] == ("-" if dev is None else f"{100 * dev:.1f}"), row
        assert cells[-2] == f"{100 * test:.1f}" and cells[-1] == f"{_se_points(test, n):.1f}", row
        assert abs(test * n - round(test * n)) < 1e-6, row  # an accuracy over n items
    items = json.loads((Path(demo.__file__).parents[1] / "evaluators" / "data" / f"{target}.json").read_text())["test"][:n]
    chance = sum(1 / len(it["choices"]) for it in items) / n
    assert f"chance level {100 * chance:.1f}%; {n} test items" in printed
    gain = 100 * (best["test_scores"][target] - exp["test_scores"][target])
    assert f"{gain:+.1f} points vs the best initial expert" in printed


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    """The real demo path (model, cached expert pool, vLLM, GENOME+, test table) at a tiny size, on the smoke pool
    (2 experts x 3 steps) so that a fresh machine trains it in a couple of minutes."""
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--output_dir", str(out), "--pool", "smoke", "--generations", "1", "--population_size", "2",
                   "--max_population_size", "3", "--n_dev", "8", "--n_test", "8", "--ensemble_k", "2", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "genome_plus" and result["n_test"] == {"arc_e": 8} and result["baselines"]["n"] == 8
    assert [e["k"] for e in result["ensembles"]] == [1, 2]
    _check_table(printed, result, "arc_e")
    # the experts start the population (2 experts, population 2) and GENOME+ keeps its elites: the evolved best is
    # at least as fit on dev as the best expert
    assert result["best"]["dev_fitness"] >= result["best_initial_expert"]["dev_fitness"]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["best"] is None or records[0]["best"] <= result["best"]["dev_fitness"] + 1e-9
    timing = next(l for l in printed.splitlines() if "time: model" in l)
    for part in ("experts", "evaluator start", "evolution (1 generation)", "scoring", "test split + ensembles",
                 "baselines", "total"):
        assert re.search(rf"{re.escape(part)} \d+\.\ds", timing), (part, timing)
    assert (out / "demo.png").stat().st_size > 0
    best = load_population([out / "best_adapter"])  # a valid PEFT folder of the evolved best
    assert best.size == 1 and best.meta.base_model
