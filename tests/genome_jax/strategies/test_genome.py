"""GENOME strategy: settings validation, ask/tell bookkeeping (elites, copies, best, metrics), search progress."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genome_jax import synthetic
from genome_jax.errors import UserError
from genome_jax.evolve import generation_keys
from genome_jax.strategies import Genome, get_strategy, initial_population, make_strategy

EXPERTS = synthetic.synthetic_experts(0, n_experts=4, n_layers=2, d_model=16, rank=4)
PROBLEM = synthetic.make_problem(EXPERTS, coeffs=[0.25, 0.25, 0.25, 0.25])
SETTINGS = dict(population_size=8, cross="linear", combine="linear", selection="tournament", sigma=0.02,
                individual_mutation_rate=0.8, gene_mutation_rate=0.5, elite_percent=0.25)
STRATEGY, PARAMS = make_strategy("genome", **SETTINGS)
RUN_KEY = jax.random.PRNGKey(99)


def _leaves(t):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]


def _start(strategy=STRATEGY, params=PARAMS, seed=0):
    pop = strategy.initial_population(jax.random.PRNGKey(seed), EXPERTS)
    fit = synthetic.score(PROBLEM, pop)
    return strategy.init(jax.random.PRNGKey(seed + 1), pop, fit, params)


def _generation(state, strategy=STRATEGY, params=PARAMS, drop=None):
    k_ask, k_tell = generation_keys(RUN_KEY, int(state.generation))
    children, state = strategy.ask(k_ask, state, params)
    need = strategy.needs_score(state)
    fit = jnp.where(need, synthetic.score(PROBLEM, children), jnp.nan)
    if drop is not None:
        fit = fit.at[drop].set(jnp.nan)
    return children, state, fit, strategy.tell(k_tell, state, children, fit, params)[0]


@pytest.mark.parametrize("kw,culprit", [
    (dict(population_size=1), "population_size"),
    (dict(cross_rate=1.5), "cross_rate"),
    (dict(individual_mutation_rate=-0.1), "individual_mutation_rate"),
    (dict(gene_mutation_rate=float("nan")), "gene_mutation_rate"),
    (dict(elite_percent=1.0), "elite_percent"),
    (dict(selection="lottery"), "selection"),
    (dict(mutation="cosmic"), "mutation"),
    (dict(survivor_selection="none"), "survivor_selection"),
    (dict(population_size=10, max_population_size=5), "max_population_size"),
    (dict(sigma=-1.0), "sigma"),
    (dict(rank_pressure=3.0), "rank_pressure"),
    (dict(tournament_size=0), "tournament_size"),
    (dict(sigma_decay=0.0), "sigma_decay"),
    (dict(max_generations=3), "max_generations"),  # the loop's max_iter now: not a strategy setting
    (dict(cross=3), "cross"),
    (dict(cross="frobnicate"), "cross"),
    (dict(combine="ties_plus"), "combine"),
])
def test_params_validation_names_the_culprit(kw, culprit):
    with pytest.raises(UserError, match=f"'{culprit}'"):
        make_strategy("genome", **kw)


def test_strategies_are_hashable_and_recordable():
    assert STRATEGY == Genome(**{k: v for k, v in SETTINGS.items() if k not in PARAMS.to_dict()})
    assert hash(STRATEGY) == hash(make_strategy("genome", **SETTINGS)[0])
    assert STRATEGY.cross.method == "linear" and STRATEGY.cross.normalize == "weight"
    d = json.loads(json.dumps(STRATEGY.record(PARAMS)))
    assert d["strategy"]["population_size"] == 8 and d["strategy"]["cross"]["__merge__"]["method"] == "linear"
    assert d["params"]["sigma"] == 0.02 and "max_generations" not in d["params"] and "patience" not in d["params"]
    assert len(jax.tree_util.tree_leaves(PARAMS)) == 7  # the numbers are pytree leaves, traced by jit
    assert STRATEGY.default_params.to_dict()["cross_rate"] == 0.8
    with pytest.raises(UserError, match="unknown method"):
        get_strategy("genome_minus")


def test_initial_population_pairs_distinct_experts_with_random_weights():
    pop = initial_population(jax.random.PRNGKey(3), EXPERTS, 6, merge_config=STRATEGY.combine)
    # each individual's factors mix exactly two distinct experts with positive weights
    a_ind = np.asarray(pop["model.layers.0.self_attn.q_proj"]["A"]).reshape(6, -1)
    a_exp = np.asarray(EXPERTS["model.layers.0.self_attn.q_proj"]["A"]).reshape(4, -1)
    for x in a_ind:
        coef, *_ = np.linalg.lstsq(a_exp.T, x, rcond=None)
        nz = np.flatnonzero(np.abs(coef) > 1e-4)
        assert len(nz) == 2 and np.all(coef[nz] > 0), coef
    same = initial_population(jax.random.PRNGKey(3), EXPERTS, 4, init_merge=False)
    for x, y in zip(_leaves(same), _leaves(EXPERTS)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(UserError, match="init_merge=False keeps all 4 experts"):
        initial_population(jax.random.PRNGKey(3), EXPERTS, 3, init_merge=False)


def test_init_refuses_wrong_sizes():
    pop = initial_population(jax.random.PRNGKey(0), EXPERTS, 5)
    with pytest.raises(UserError, match="population_size"):
        STRATEGY.init(jax.random.PRNGKey(0), pop, jnp.zeros(5), PARAMS)


def test_elites_are_exact_copies_and_not_rescored():
    state = _start()
    children, asked, fit, told = _generation(state)
    n_elite = STRATEGY.n_elite
    assert n_elite == 2
    top = np.argsort(-np.asarray(state.fitness), kind="stable")[:n_elite]
    src = np.asarray(asked.child_source)
    np.testing.assert_array_equal(src[:n_elite], top)
    for c, p in zip(_leaves(children), _leaves(state.population)):
        np.testing.assert_array_equal(c[:n_elite], p[top])
    need = np.asarray(STRATEGY.needs_score(asked))
    assert not need[:n_elite].any() and need[n_elite:].any()
    # copies inherit their source's fitness (they were passed NaN)
    np.testing.assert_array_equal(np.asarray(told.fitness)[src >= 0], np.asarray(state.fitness)[src[src >= 0]])
    assert np.all(np.isnan(np.asarray(fit)[src >= 0]))
    # every child marked as a copy is bit-identical to its source
    for i in np.flatnonzero(src >= 0):
        for c, p in zip(_leaves(children), _leaves(state.population)):
            np.testing.assert_array_equal(c[i], p[src[i]])


def test_no_variation_means_all_copies_and_a_stall():
    strategy, params = make_strategy("genome", **{**SETTINGS, "cross_rate": 0.0, "individual_mutation_rate": 0.0})
    state = _start(strategy, params)
    for g in range(2):
        _, asked, _, state = _generation(state, strategy, params)
        assert not np.any(np.asarray(strategy.needs_score(asked)))
    assert int(state.stall) == 2 and strategy.metrics(state)["stall"] == 2


def test_nan_fitness_never_becomes_best_or_elite():
    state = _start()
    children, asked, fit, told = _generation(state, drop=np.arange(2, 8))  # every new child failed
    assert np.isfinite(float(told.best_fitness))
    assert float(told.best_fitness) == float(state.best_fitness)
    _, asked2, _, _ = _generation(told)
    src = np.asarray(asked2.child_source)[:2]
    assert np.all(np.isfinite(np.asarray(told.fitness)[src]))


def test_best_is_the_best_fitness_ever_scored_and_metrics_say_so():
    """best_fitness is the maximum over every fitness scored so far (the initial population and each generation's
    new children), including generations whose own population is worse; the stored best individual scores it."""
    state = _start()
    seen = list(np.asarray(state.fitness))
    drops = [None, np.arange(8), None, None]  # generation 2: every evaluation failed
    for drop in drops:
        _, asked, fit, state = _generation(state, drop=drop)
        f = np.asarray(fit)
        seen += list(f[np.isfinite(f)])
        assert float(state.best_fitness) == max(seen)
    m = STRATEGY.metrics(state)
    f = np.asarray(state.fitness)
    np.testing.assert_allclose([m["best"], m["mean"], m["worst"]], [f.max(), f.mean(), f.min()], rtol=1e-6)
    assert float(m["best_ever"]) == max(seen) and int(m["population"]) == 8
    # the stored best individual scores what the state says
    best = jax.tree_util.tree_map(lambda a: a[None], state.best)
    assert float(synthetic.score(PROBLEM, best)[0]) == pytest.approx(float(state.best_fitness), abs=1e-6)


def test_jit_and_nojit_generation_agree():
    state = _start()
    k_ask, k_tell = generation_keys(RUN_KEY, 0)
    ch_j, st_j = STRATEGY.ask(k_ask, state, PARAMS)
    with jax.disable_jit():
        ch_n, st_n = STRATEGY.ask(k_ask, state, PARAMS)
    np.testing.assert_array_equal(np.asarray(st_j.child_source), np.asarray(st_n.child_source))
    for a, b in zip(_leaves(ch_j), _leaves(ch_n)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    fit = jnp.where(STRATEGY.needs_score(st_j), synthetic.score(PROBLEM, ch_j), jnp.nan)
    t_j = STRATEGY.tell(k_tell, st_j, ch_j, fit, PARAMS)
    with jax.disable_jit():
        t_n = STRATEGY.tell(k_tell, st_j, ch_j, fit, PARAMS)
    for a, b in zip(_leaves(t_j), _leaves(t_n)):
        np.testing.assert_array_equal(a, b)


def test_genome_improves_the_synthetic_problem():
    state = _start()
    m0 = STRATEGY.metrics(state)
    for _ in range(15):
        _, _, _, state = _generation(state)
    m = STRATEGY.metrics(state)
    assert m["best"] > m0["best"] + 0.03, (m0, m)
    assert m["mean"] > m0["mean"] + 0.1, (m0, m)


def test_parent_weights_modes():
    from genome_jax.strategies.common import parent_weights

    pf = jnp.asarray([[0.2, 0.6], [-1.0, -3.0], [jnp.nan, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(parent_weights(None, pf, "equal")), 0.5)
    np.testing.assert_allclose(np.asarray(parent_weights(None, pf, "fitness")),
                               [[0.25, 0.75], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], atol=1e-6)
    w = np.asarray(parent_weights(jax.random.PRNGKey(0), jnp.zeros((500, 3)), "random"))
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert np.all(w > 0) and w.std() > 0.1


def test_svd_mutation_inside_a_generation():
    strategy, params = make_strategy("genome", population_size=8, cross="linear", combine="linear", mutation="svd",
                                     cross_rate=0.0, individual_mutation_rate=1.0, gene_mutation_rate=1.0, sigma=0.2,
                                     elite_percent=0.25)
    state = _start(strategy, params)
    children, asked, fit, told = _generation(state, strategy, params)
    src = np.asarray(asked.child_source)
    assert np.all(src[2:] == -1)  # every bred child was mutated
    assert np.all(np.isfinite(np.asarray(told.fitness)))
    m = "model.layers.0.self_attn.q_proj"
    for i in range(2, 8):  # ΔW of a mutated child stays in its parent's singular subspaces (rank <= r)
        w = np.asarray(children[m]["B"][i]) @ np.asarray(children[m]["A"][i])
        assert np.linalg.matrix_rank(w, tol=1e-4) <= 4


def test_default_params_with_ties_crossover_improve():
    strategy, params = make_strategy("genome", population_size=8)  # GENOME defaults: TIES merges, roulette
    assert strategy.cross.method == "ties" and strategy.combine.method == "ties"
    state = _start(strategy, params)
    m0 = strategy.metrics(state)
    for _ in range(15):
        _, _, _, state = _generation(state, strategy, params)
    m = strategy.metrics(state)
    assert m["best"] > m0["best"] + 0.01, (m0, m)
    assert m["mean"] > m0["mean"] + 0.04, (m0, m)
