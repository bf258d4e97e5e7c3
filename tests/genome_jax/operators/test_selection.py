"""Selection operators against probabilities written in numpy from their definitions."""
from __future__ import annotations

from math import comb

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genome_jax.operators import selection as sel

N_DRAWS = 20000


def _freq(idx, p):
    return np.bincount(np.asarray(idx), minlength=p) / np.asarray(idx).size


def _assert_dist(idx, probs, n=N_DRAWS):
    """Each category's frequency within 5 binomial standard errors of its probability (zero stays zero)."""
    probs = np.asarray(probs, np.float64)
    f = _freq(idx, probs.size)
    se = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(f - probs) <= 5 * se + 1e-12), (f, probs)


def np_roulette(f):
    f = np.asarray(f, np.float64)
    ok = np.isfinite(f)
    if not ok.any():
        return np.full(f.size, 1 / f.size)
    w = np.where(ok, f, 0.0)
    if f[ok].min() < 0:
        w = np.where(ok, f - f[ok].min(), 0.0)
    if w.sum() == 0:
        w = ok.astype(float)
    return w / w.sum()


def np_rank(f, s):
    f = np.asarray(f, np.float64)
    ok = np.isfinite(f)
    m = ok.sum()
    p = np.zeros(f.size)
    for i in np.flatnonzero(ok):
        less = np.sum(f[ok] < f[i])
        eq = np.sum(f[ok] == f[i]) - 1
        r = less + eq / 2
        p[i] = (2 - s) / m + 2 * r * (s - 1) / (m * (m - 1))
    return p


def np_tournament(f, k):
    """P(i wins) = C(#valid worse than i, k-1) / C(M, k) for distinct finite fitness (contestants among the valid)."""
    f = np.asarray(f, np.float64)
    ok = np.isfinite(f)
    m = ok.sum()
    k = min(k, m)
    p = np.zeros(f.size)
    for i in np.flatnonzero(ok):
        worse = np.sum(f[ok] < f[i])
        p[i] = comb(worse, k - 1) / comb(m, k)
    return p


F_POS = [0.1, np.nan, 0.5, 0.3, 0.0, 0.8]
F_NEG = [-1.0, -0.2, np.nan, -3.0, 0.5, -np.inf]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("f", [F_POS, F_NEG, [0.2, 0.2, np.nan, 0.2]], ids=["pos", "neg", "equal"])
def test_roulette_matches_definition(f, jit):
    fn = jax.jit(sel.roulette, static_argnums=2) if jit else sel.roulette
    idx = fn(jax.random.PRNGKey(0), jnp.asarray(f, jnp.float32), N_DRAWS)
    _assert_dist(idx, np_roulette(f))
    np.testing.assert_allclose(np.asarray(sel.roulette_weights(jnp.asarray(f, jnp.float32))) /
                               np.sum(np.asarray(sel.roulette_weights(jnp.asarray(f, jnp.float32)))), np_roulette(f),
                               rtol=1e-6, atol=1e-7)


def test_roulette_all_nan_is_uniform():
    idx = sel.roulette(jax.random.PRNGKey(1), jnp.full((4,), jnp.nan), N_DRAWS)
    _assert_dist(idx, np.full(4, 0.25))


@pytest.mark.parametrize("f,k", [([0.1, 0.9, 0.4, 0.7, 0.2, 0.5], 2), (F_POS, 3), (F_NEG, 2)])
def test_tournament_without_replacement_matches_definition(f, k):
    idx = jax.jit(sel.tournament, static_argnums=2, static_argnames="size")(
        jax.random.PRNGKey(2), jnp.asarray(f, jnp.float32), N_DRAWS, size=k)
    _assert_dist(idx, np_tournament(f, k))


def test_tournament_is_without_replacement():
    """With replacement, the worst of 6 would win a size-2 tournament 1/36 of the time; without, never."""
    f = jnp.asarray([0.1, 0.9, 0.4, 0.7, 0.2, 0.5])
    idx = np.asarray(sel.tournament(jax.random.PRNGKey(3), f, N_DRAWS, size=2))
    assert not np.any(idx == 0)
    # size = P: every tournament holds everyone, so the best always wins
    assert np.all(np.asarray(sel.tournament(jax.random.PRNGKey(4), f, 500, size=6)) == 1)
    # size > P is clamped to P
    assert np.all(np.asarray(sel.tournament(jax.random.PRNGKey(4), f, 50, size=60)) == 1)


def test_tournament_jit_equals_nojit():
    f = jnp.asarray(F_NEG, jnp.float32)
    a = jax.jit(sel.tournament, static_argnums=2, static_argnames="size")(jax.random.PRNGKey(5), f, 64, size=3)
    with jax.disable_jit():
        b = sel.tournament(jax.random.PRNGKey(5), f, 64, size=3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("percent,top", [(0.5, 3), (0.3, 2), (0.01, 1), (1.0, 5)])
def test_truncation_uniform_over_top(percent, top):
    f = jnp.asarray(F_POS, jnp.float32)  # valid: 5; order 5 (0.8), 2, 3, 0, 4
    idx = sel.truncation(jax.random.PRNGKey(6), f, N_DRAWS, percent=percent)
    order = [5, 2, 3, 0, 4]
    probs = np.zeros(6)
    probs[order[:top]] = 1 / top
    _assert_dist(idx, probs)


@pytest.mark.parametrize("s", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("f", [F_POS, F_NEG, [0.3, 0.1, 0.3, np.nan, 0.7]], ids=["pos", "neg", "ties"])
def test_rank_matches_linear_ranking(f, s):
    want = np_rank(f, s)
    np.testing.assert_allclose(np.asarray(sel.rank_weights(jnp.asarray(f, jnp.float32), s)), want, atol=1e-6)
    idx = sel.rank(jax.random.PRNGKey(7), jnp.asarray(f, jnp.float32), N_DRAWS, pressure=s)
    _assert_dist(idx, want)


@pytest.mark.parametrize("method", sel.PARENT_METHODS)
def test_nan_never_selected(method):
    f = jnp.asarray([np.nan, -5.0, np.nan, 2.0, np.inf, -np.inf, 1.0, np.nan], jnp.float32)
    idx = np.asarray(sel.select_parents(jax.random.PRNGKey(8), f, 5000, method=method, tournament_size=4))
    assert set(np.unique(idx)) <= {1, 3, 6}, np.unique(idx)
    surv = np.asarray(sel.survivors(jax.random.PRNGKey(8), f, 3, n_elite=1, method=method, tournament_size=2))
    assert sorted(surv) == [1, 3, 6] and surv[0] == 3


def test_elites_and_order():
    f = jnp.asarray([0.5, np.nan, 0.9, 0.5, -np.inf, 0.9, -1.0])
    np.testing.assert_array_equal(np.asarray(sel.elites(f, 4)), [2, 5, 0, 3])  # ties by index
    np.testing.assert_array_equal(np.asarray(sel.descending_order(f))[-2:], [1, 4])  # non-finite last
    # the strategies' one elite-count rule: ceil, so any positive percentage keeps at least one elite
    assert sel.n_elites(10, 0.1) == 1 and sel.n_elites(10, 0.25) == 3 and sel.n_elites(10, 0.0) == 0
    assert sel.n_elites(10, 0.02) == 1 and sel.n_elites(8, 0.25) == 2 and sel.n_elites(3, 0.34) == 2


@pytest.mark.parametrize("method", sel.SURVIVOR_METHODS)
def test_survivors_are_distinct_with_elites_first(method):
    rng = np.random.default_rng(0)
    f = jnp.asarray(rng.standard_normal(12), jnp.float32)
    fn = jax.jit(sel.survivors, static_argnums=2, static_argnames=("n_elite", "method", "tournament_size"))
    for seed in range(5):
        s = np.asarray(fn(jax.random.PRNGKey(seed), f, 7, n_elite=2, method=method, tournament_size=3))
        assert len(set(s)) == 7
        np.testing.assert_array_equal(s[:2], np.argsort(-np.asarray(f))[:2])
    if method == "truncation":
        np.testing.assert_array_equal(s, np.argsort(-np.asarray(f))[:7])


def test_roulette_survivors_first_pick_is_roulette():
    """Gumbel top-k = successive sampling: the first non-elite pick follows the roulette probabilities."""
    f = jnp.asarray([0.1, 0.4, 0.2, 0.3], jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(9), 8000)
    first = jax.vmap(lambda k: sel.survivors(k, f, 2, n_elite=0, method="roulette"))(keys)[:, 0]
    _assert_dist(first, np_roulette(np.asarray(f)), n=8000)
    # the second pick is conditional on the first: P(second = j | first = i) = w_j / (1 - w_i)
    both = np.asarray(jax.vmap(lambda k: sel.survivors(k, f, 2, n_elite=0, method="roulette"))(keys))
    w = np_roulette(np.asarray(f))
    sub = both[both[:, 0] == 1][:, 1]
    want = np.where(np.arange(4) == 1, 0, w / (1 - w[1]))
    _assert_dist(sub, want, n=sub.size)
