"""The synthetic TEST PROBLEM (score vs dense numpy) and its resumable driver."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genome_jax import synthetic
from genome_jax.errors import UserError
from genome_jax.strategies import make_strategy

EXPERTS = synthetic.synthetic_experts(3, n_experts=3, n_layers=2, d_model=16, rank=4, modules=("q_proj", "down_proj"))


def np_score(experts, coeffs, pop):
    """Dense reference: -||ΔW - Σ c_k ΔW_k|| / ||Σ c_k ΔW_k|| over all modules."""
    p = jax.tree_util.tree_leaves(pop)[0].shape[0]
    num, den = np.zeros(p), 0.0
    for m, v in experts.items():
        t = sum(c * np.asarray(v["B"][k], np.float64) @ np.asarray(v["A"][k], np.float64) for k, c in enumerate(coeffs))
        den += np.sum(t**2)
        for i in range(p):
            w = np.asarray(pop[m]["B"][i], np.float64) @ np.asarray(pop[m]["A"][i], np.float64)
            num[i] += np.sum((w - t) ** 2)
    return -np.sqrt(num / den)


def test_module_is_labelled_a_test_problem():
    assert "TEST PROBLEM" in synthetic.__doc__


def test_score_matches_dense_numpy():
    coeffs = [0.5, 0.3, 0.2]
    prob = synthetic.make_problem(EXPERTS, coeffs)
    rng = np.random.default_rng(0)
    pop = jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a)[rng.integers(0, 3, 5)] + 0.1 * rng.standard_normal((5,) + a.shape[1:]),
                              jnp.float32), EXPERTS)
    np.testing.assert_allclose(np.asarray(synthetic.score(prob, pop)), np_score(EXPERTS, coeffs, pop), rtol=2e-4)
    np.testing.assert_allclose(np.asarray(synthetic.score(prob, EXPERTS)), np_score(EXPERTS, coeffs, EXPERTS),
                               rtol=2e-4)
    # deterministic, bit for bit
    assert np.asarray(synthetic.score(prob, pop)).tobytes() == np.asarray(synthetic.score(prob, pop)).tobytes()


def test_the_target_scores_zero_and_zero_scores_minus_one():
    prob = synthetic.make_problem(EXPERTS, [0.0, 1.0, 0.0])
    f = np.asarray(synthetic.score(prob, EXPERTS))
    assert abs(f[1]) < 1e-3 and f[0] < -0.5 and f[2] < -0.5
    zero = jax.tree_util.tree_map(jnp.zeros_like, EXPERTS)
    np.testing.assert_allclose(np.asarray(synthetic.score(prob, zero)), -1.0, rtol=1e-5)


def test_problem_checks_coefficients():
    with pytest.raises(UserError, match="coefficients"):
        synthetic.make_problem(EXPERTS, [0.5, 0.5])
    c = np.asarray(synthetic.make_problem(EXPERTS, seed=7).coeffs)
    assert c.shape == (3,) and abs(c.sum() - 1) < 1e-6 and np.all(c > 0)


SETTINGS = dict(population_size=6, max_population_size=8, n_offspring=3, cross="linear", combine="linear",
                selection="tournament", sigma=0.02, individual_mutation_rate=0.8, gene_mutation_rate=0.5,
                elite_percent=0.2)


def _tree_bytes(t):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(t)]


@pytest.mark.parametrize("method", ["genome", "genome_plus"])
def test_driver_resumes_to_the_same_result(tmp_path, method):
    strategy, params = make_strategy(method, **SETTINGS)
    run = lambda out, g: synthetic.run_synthetic(tmp_path / out, strategy, params, seed=5, generations=g,  # noqa: E731
                                                 experts=EXPERTS)
    full = run("full", 6)
    assert full.generations == 6 and full.resumed_from is None
    assert [h["generation"] for h in full.history] == list(range(7))  # one metrics record per generation
    assert full.best_fitness == max(h["best"] for h in full.history) == full.history[-1]["best_ever"]
    part = run("part", 3)
    assert part.generations == 3
    rest = run("part", 6)
    assert rest.resumed_from == 3 and rest.generations == 6
    assert _tree_bytes(rest.state) == _tree_bytes(full.state)
    assert _tree_bytes(rest.best) == _tree_bytes(full.best)
    assert rest.history == [{**h, "time_s": r["time_s"]} for h, r in zip(full.history[4:], rest.history)]
    # empty slots are never scored; in GENOME the elites are not re-scored either
    n_children = 3 * strategy.num_children
    assert rest.evaluations < n_children if method == "genome" else rest.evaluations <= n_children
    assert rest.evaluations == sum(h["scored"] for h in rest.history)
    # finished: running again does nothing and changes nothing
    again = run("part", 6)
    assert again.evaluations == 0 and _tree_bytes(again.state) == _tree_bytes(full.state)


def test_driver_refuses_a_different_config(tmp_path):
    strategy, params = make_strategy("genome", **SETTINGS)
    synthetic.run_synthetic(tmp_path / "r", strategy, params, seed=5, generations=1, experts=EXPERTS)
    with pytest.raises(UserError, match=r"params\.sigma: 0\.02 -> 0\.03"):
        synthetic.run_synthetic(tmp_path / "r", strategy, params.replace(sigma=0.03), seed=5, generations=2,
                                experts=EXPERTS)
    with pytest.raises(UserError, match="seed: 5 -> 6"):
        synthetic.run_synthetic(tmp_path / "r", strategy, params, seed=6, generations=2, experts=EXPERTS)


def test_early_stopping_is_a_setting_of_the_loop(tmp_path):
    """patience: the loop stops after that many generations without a better best; it is not part of the run's
    identity, and no variation at all (rates 0) never improves."""
    strategy, params = make_strategy("genome", **{**SETTINGS, "cross_rate": 0.0, "individual_mutation_rate": 0.0})
    run = synthetic.run_synthetic(tmp_path / "p", strategy, params, seed=5, generations=10, patience=2,
                                  experts=EXPERTS)
    assert run.generations == 2 and int(run.state.stall) == 2 and run.evaluations == 6  # generation 0 only
    more = synthetic.run_synthetic(tmp_path / "p", strategy, params, seed=5, generations=10, patience=4,
                                   experts=EXPERTS)
    assert more.resumed_from == 2 and more.generations == 4
