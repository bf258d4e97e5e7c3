"""GENOME+ strategy: growing population, succession bookkeeping (velocities, personal/global best/worst), progress."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genome_jax import synthetic
from genome_jax.errors import UserError
from genome_jax.evolve import generation_keys
from genome_jax.strategies import initial_population, make_strategy

EXPERTS = synthetic.synthetic_experts(0, n_experts=4, n_layers=2, d_model=16, rank=4)
PROBLEM = synthetic.make_problem(EXPERTS, coeffs=[0.25, 0.25, 0.25, 0.25])
STRATEGY, PARAMS = make_strategy("genome_plus", population_size=4, max_population_size=10, n_offspring=3,
                                 cross="linear", combine="linear", selection="tournament", sigma=0.02,
                                 individual_mutation_rate=0.8, gene_mutation_rate=0.5, elite_percent=0.1)
RUN_KEY = jax.random.PRNGKey(99)
N, C = 10, 3


def _leaves(t):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]


def _start(strategy=STRATEGY, params=PARAMS, seed=0):
    pop = strategy.initial_population(jax.random.PRNGKey(seed), EXPERTS)
    return strategy.init(jax.random.PRNGKey(seed + 1), pop, synthetic.score(PROBLEM, pop), params)


def _generation(state, strategy=STRATEGY, params=PARAMS, nan_all=False):
    k_ask, k_tell = generation_keys(RUN_KEY, int(state.generation))
    children, asked = strategy.ask(k_ask, state, params)
    fit = jnp.where(strategy.needs_score(asked), synthetic.score(PROBLEM, children), jnp.nan)
    if nan_all:
        fit = jnp.full_like(fit, jnp.nan)
    return children, asked, fit, strategy.tell(k_tell, asked, children, fit, params)[0]


def test_init_pads_to_capacity():
    state = _start()
    assert int(state.size) == 4 and state.fitness.shape == (N,)
    assert np.all(np.isnan(np.asarray(state.fitness)[4:])) and np.all(np.isfinite(np.asarray(state.fitness)[:4]))
    assert STRATEGY.num_children == N + C and STRATEGY.population_sizes == {4, N, N + C}
    pop = initial_population(jax.random.PRNGKey(0), EXPERTS, 11)
    with pytest.raises(UserError, match="max_population_size"):
        STRATEGY.init(jax.random.PRNGKey(0), pop, jnp.zeros(11), PARAMS)


def test_population_grows_to_the_maximum_and_stays():
    state = _start()
    sizes = []
    for _ in range(4):
        children, asked, fit, state = _generation(state)
        sizes.append(int(state.size))
        alive = np.arange(N) < int(state.size)
        assert np.all(np.isfinite(np.asarray(state.fitness)[alive]))
        assert np.all(np.isnan(np.asarray(state.fitness)[~alive]))
    assert sizes == [7, 10, 10, 10]


def test_empty_slots_are_never_scored_and_particles_move():
    state = _start()
    children, asked, fit, told = _generation(state)
    alive = np.asarray(asked.child_alive)
    np.testing.assert_array_equal(alive, np.r_[np.arange(N) < 4, np.ones(C, bool)])
    need = np.asarray(STRATEGY.needs_score(asked))
    assert not need[4:N].any()
    # a particle needs scoring exactly when succession moved it
    moved = [any(not np.array_equal(c[i], p[i]) for c, p in zip(_leaves(children), _leaves(state.population)))
             for i in range(4)]
    np.testing.assert_array_equal(need[:4], moved)


def test_personal_and_global_bests_and_worst():
    state = _start()
    seen = list(np.asarray(state.fitness)[:4])
    for _ in range(4):
        children, asked, fit, state = _generation(state)
        f = np.asarray(fit)
        src = np.asarray(asked.child_source)
        seen += list(f[np.isfinite(f)])
        alive = np.arange(N) < int(state.size)
        pbf, cur = np.asarray(state.pbest_fitness)[alive], np.asarray(state.fitness)[alive]
        assert np.all(pbf >= cur)  # a personal best is at least as good as where the particle is
    assert float(state.best_fitness) == pytest.approx(max(seen))
    assert float(state.worst_fitness) == pytest.approx(min(seen))
    for which, val in ((state.best, state.best_fitness), (state.worst, state.worst_fitness)):
        one = jax.tree_util.tree_map(lambda a: a[None], which)
        assert float(synthetic.score(PROBLEM, one)[0]) == pytest.approx(float(val), abs=1e-6)
    # every personal best position scores its recorded fitness
    alive = np.arange(N) < int(state.size)
    got = np.asarray(synthetic.score(PROBLEM, state.pbest))[alive]
    np.testing.assert_allclose(got, np.asarray(state.pbest_fitness)[alive], atol=1e-6)


def test_offspring_join_with_zero_velocity():
    state = _start()
    children, asked, fit, told = _generation(state)
    ch, pop, vel, pb = (_leaves(t) for t in (children, told.population, told.velocity, told.pbest))
    joined = 0
    for j in range(N, N + C):
        for i in range(int(told.size)):
            if all(np.array_equal(c[j], p[i]) for c, p in zip(ch, pop)):
                joined += 1
                assert all(np.all(v[i] == 0) for v in vel)
                assert all(np.array_equal(b[i], p[i]) for b, p in zip(pb, pop))
    assert joined == C  # the population is still growing: every offspring joined


def test_a_generation_where_everything_failed_changes_nothing():
    state = _start()
    _, _, _, state = _generation(state)
    _, _, _, after = _generation(state, nan_all=True)
    for a, b in zip(_leaves(after.population), _leaves(state.population)):
        np.testing.assert_array_equal(a, b)
    assert int(after.size) == int(state.size) and int(after.generation) == int(state.generation) + 1


@pytest.mark.parametrize("survivor", ["roulette", "tournament"])
def test_stochastic_survivor_selection_keeps_elites(survivor):
    strategy, params = make_strategy("genome_plus", population_size=4, max_population_size=5, n_offspring=4,
                                     cross="linear", combine="linear", survivor_selection=survivor, elite_percent=0.2)
    state = _start(strategy, params)
    for _ in range(3):
        _, asked, fit, new = _generation(state, strategy, params)
        pool = np.asarray(genome_jax_inherit(asked, fit, state))
        assert int(new.size) == 5
        assert float(np.max(np.asarray(new.fitness))) == pytest.approx(np.nanmax(pool))
        state = new


def genome_jax_inherit(asked, fit, state):
    from genome_jax.strategies.common import inherit_fitness

    f = inherit_fitness(fit, asked.child_source, state.fitness)
    return jnp.where(asked.child_alive, f, jnp.nan)


def test_genome_plus_improves_the_synthetic_problem():
    state = _start()
    m0 = STRATEGY.metrics(state)
    for _ in range(12):
        _, _, _, state = _generation(state)
    m = STRATEGY.metrics(state)
    assert m["best"] > m0["best"] + 0.03, (m0, m)
    assert m["mean"] > m0["mean"] + 0.1, (m0, m)


def test_tell_reports_metrics_of_the_new_state():
    state = _start()
    k_ask, k_tell = generation_keys(RUN_KEY, 0)
    children, asked = STRATEGY.ask(k_ask, state, PARAMS)
    fit = jnp.where(STRATEGY.needs_score(asked), synthetic.score(PROBLEM, children), jnp.nan)
    told, m = STRATEGY.tell(k_tell, asked, children, fit, PARAMS)
    f = np.asarray(told.fitness)
    f = f[np.isfinite(f)]
    assert int(m["population"]) == int(told.size) == len(f) == 7 and int(m["children"]) == 4 + C
    np.testing.assert_allclose([m["best"], m["mean"], m["worst"]], [f.max(), f.mean(), f.min()], rtol=1e-6)
    assert float(m["best_ever"]) == float(told.best_fitness) and int(m["stall"]) == int(told.stall)
