"""Succession (PSO step) against a numpy transcription of the update rule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genome_jax.operators.succession import (
    SuccessionConfig,
    succession,
    succession_coefficients,
    update_personal_best,
)


def _tree(rng, p):
    return {"m": {"A": rng.standard_normal((p, 3, 5)).astype(np.float32),
                  "B": rng.standard_normal((p, 4, 3)).astype(np.float32)}}


def _np_step(x, v, pb, g, w, r, cfg, lam):
    col = lambda c: c.reshape((-1,) + (1,) * (x.ndim - 1))
    vn = (col(r[0]) * cfg.inertia * v + col(r[1]) * cfg.cognitive * (pb - x) + col(r[2]) * cfg.social * (g[None] - x)
          - col(r[3]) * cfg.repel * (w[None] - x))
    return x + lam * vn, vn


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_succession_matches_numpy(jit):
    rng = np.random.default_rng(0)
    p = 7
    x, v, pb = _tree(rng, p), _tree(rng, p), _tree(rng, p)
    g = jax.tree_util.tree_map(lambda a: a[0] * 0.5, _tree(rng, 1))
    w = jax.tree_util.tree_map(lambda a: a[0] * 2.0, _tree(rng, 1))
    cfg = SuccessionConfig(inertia=0.7, cognitive=0.4, social=0.6, repel=0.2,
                           step_size=optax.exponential_decay(0.8, transition_steps=1, decay_rate=0.5))
    key = jax.random.PRNGKey(3)
    fn = lambda *a: succession(*a, step=2, config=cfg)
    if jit:
        xn, vn = jax.jit(fn)(key, x, v, pb, g, w)
    else:
        with jax.disable_jit():
            xn, vn = fn(key, x, v, pb, g, w)
    r = np.asarray(succession_coefficients(key, p))
    assert r.shape == (4, p) and np.all((r >= 0) & (r < 1))
    for m in x:
        for name in ("A", "B"):
            ex, ev = _np_step(x[m][name], v[m][name], pb[m][name], g[m][name], w[m][name], r, cfg, 0.8 * 0.25)
            np.testing.assert_allclose(np.asarray(xn[m][name]), ex, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(vn[m][name]), ev, rtol=1e-5, atol=1e-5)


def test_coefficients_are_redrawn_per_particle():
    r1 = np.asarray(succession_coefficients(jax.random.PRNGKey(0), 50))
    assert r1.shape == (4, 50) and len(np.unique(r1[2])) == 50  # per particle
    assert abs(r1.mean() - 0.5) < 0.1


def test_genome_plus_redraws_the_coefficients_every_generation():
    """Per step, as GENOME+ runs it: the same swarm asked with the keys the loop (genome_jax.evolve) gives two
    consecutive generations moves with other coefficients (other velocities), and with one generation's key twice,
    identically. Fails if the loop reused a generation's key or the strategy drew its coefficients elsewhere."""
    from genome_jax import synthetic
    from genome_jax.evolve import generation_keys
    from genome_jax.strategies import make_strategy

    experts = synthetic.synthetic_experts(0, n_experts=4, n_layers=1, d_model=8, rank=2)
    strategy, params = make_strategy("genome_plus", population_size=4, cross="linear", combine="linear",
                                     individual_mutation_rate=0.0, step_size_decay=1.0)
    pop = strategy.initial_population(jax.random.PRNGKey(0), experts)
    state = strategy.init(None, pop, jnp.asarray([0.1, 0.4, 0.2, 0.3]), params)
    run_key = jax.random.PRNGKey(7)

    def velocity(generation):
        _, asked = strategy.ask(generation_keys(run_key, generation)[0], state, params)
        return np.concatenate([np.asarray(x)[:4].ravel() for x in jax.tree_util.tree_leaves(asked.velocity)])

    v0, v1 = velocity(0), velocity(1)
    assert np.abs(v0).max() > 0  # the particles do move
    np.testing.assert_array_equal(v0, velocity(0))
    assert not np.allclose(v0, v1)


def test_swarm_at_rest_on_the_best_only_feels_the_repel_term():
    rng = np.random.default_rng(1)
    x = _tree(rng, 3)
    g = jax.tree_util.tree_map(lambda a: a[0], x)
    zeros = jax.tree_util.tree_map(np.zeros_like, x)
    same = jax.tree_util.tree_map(lambda a: np.repeat(a[:1], 3, 0), x)
    cfg = SuccessionConfig(repel=0.0)
    xn, vn = succession(jax.random.PRNGKey(0), same, zeros, same, g, g, config=cfg)
    for a, b in zip(jax.tree_util.tree_leaves(xn), jax.tree_util.tree_leaves(same)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # with repel, particles move directly away from the worst
    w = jax.tree_util.tree_map(lambda a: a + 1.0, g)
    xn, _ = succession(jax.random.PRNGKey(0), same, zeros, same, g, w, config=SuccessionConfig(repel=1.0))
    for a, b in zip(jax.tree_util.tree_leaves(xn), jax.tree_util.tree_leaves(same)):
        assert np.all(np.asarray(a) <= b)


def test_personal_best_update():
    pb = {"A": jnp.asarray([[1.0], [2.0], [3.0], [4.0]])}
    x = {"A": jnp.asarray([[10.0], [20.0], [30.0], [40.0]])}
    pbf = jnp.asarray([0.5, 0.5, jnp.nan, 0.5])
    f = jnp.asarray([0.7, jnp.nan, 0.1, 0.5])
    npb, npbf = update_personal_best(pb, pbf, x, f)
    np.testing.assert_array_equal(np.asarray(npb["A"])[:, 0], [10.0, 2.0, 30.0, 4.0])  # equal is not better
    np.testing.assert_array_equal(np.asarray(npbf), np.asarray([0.7, 0.5, 0.1, 0.5], np.float32))
