"""Mutation operators against their definitions (numpy statistics and numpy SVD), jitted and not."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genome_jax.operators.mutation import gaussian_mutation, svd_mutation

JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])


def _pop(seed, p, r=4, d_in=24, d_out=16, modules=("m0", "m1"), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {m: {"A": jnp.asarray(rng.standard_normal((p, r, d_in)), dtype),
                "B": jnp.asarray(rng.standard_normal((p, d_out, r)), dtype)} for m in modules}


def _call(fn, jit, key, pop, **kw):
    if jit:
        return jax.jit(lambda k, t: fn(k, t, **kw))(key, pop)
    with jax.disable_jit():
        return fn(key, pop, **kw)


def _flat(tree):
    """(P, genes) numpy: every gene of each individual."""
    return np.concatenate([np.asarray(l).reshape(l.shape[0], -1) for l in jax.tree_util.tree_leaves(tree)], axis=1)


def test_gaussian_rates_and_noise_match_definition():
    p, ind_rate, gene_rate, sigma = 400, 0.3, 0.2, 0.05
    pop = _pop(0, p, r=2, d_in=8, d_out=6)
    out, mutated = _call(gaussian_mutation, True, jax.random.PRNGKey(1), pop, individual_rate=ind_rate,
                         gene_rate=gene_rate, sigma=sigma)
    x, y = _flat(pop), _flat(out)
    changed = y != x
    picked = changed.any(axis=1)
    np.testing.assert_array_equal(np.asarray(mutated), picked)
    # individuals: Binomial(400, 0.3) -> 120 +- 9.2; 4 sd
    assert abs(picked.sum() - p * ind_rate) < 4 * np.sqrt(p * ind_rate * (1 - ind_rate))
    # genes inside picked individuals: Binomial(n, 0.2)
    n = picked.sum() * x.shape[1]
    k = changed[picked].sum()
    assert abs(k - n * gene_rate) < 4 * np.sqrt(n * gene_rate * (1 - gene_rate))
    # noise on changed genes ~ N(0, sigma^2): mean and std within 4 standard errors
    d = (y - x)[changed]
    assert abs(d.mean()) < 4 * sigma / np.sqrt(d.size)
    assert abs(d.std() / sigma - 1) < 4 / np.sqrt(2 * d.size)
    # unpicked individuals are bit-identical
    np.testing.assert_array_equal(y[~picked], x[~picked])


@JIT  # the eager (no-jit) path runs here, on a small population
def test_gaussian_full_rates_adds_noise_everywhere(jit):
    pop = _pop(1, 16)
    out, mutated = _call(gaussian_mutation, jit, jax.random.PRNGKey(2), pop, individual_rate=1.0, gene_rate=1.0,
                         sigma=0.1)
    d = _flat(out) - _flat(pop)
    assert np.all(np.asarray(mutated)) and np.all(d != 0)
    assert abs(d.std() / 0.1 - 1) < 4 / np.sqrt(2 * d.size)


def test_gaussian_zero_rates_or_sigma_change_nothing():
    pop = _pop(2, 8)
    for kw in ({"individual_rate": 0.0, "gene_rate": 1.0, "sigma": 1.0},
               {"individual_rate": 1.0, "gene_rate": 0.0, "sigma": 1.0},
               {"individual_rate": 1.0, "gene_rate": 1.0, "sigma": 0.0}):
        out, mutated = gaussian_mutation(jax.random.PRNGKey(0), pop, **kw)
        np.testing.assert_array_equal(_flat(out), _flat(pop))
        assert not np.any(np.asarray(mutated)), kw


def test_gaussian_sigma_schedule_is_evaluated_at_step():
    pop = _pop(3, 32)
    sched = optax.exponential_decay(init_value=1.0, transition_steps=1, decay_rate=0.5)
    out, _ = gaussian_mutation(jax.random.PRNGKey(4), pop, individual_rate=1.0, gene_rate=1.0, sigma=sched, step=3)
    d = _flat(out) - _flat(pop)
    assert abs(d.std() / 0.125 - 1) < 4 / np.sqrt(2 * d.size)


def test_gaussian_jit_equals_nojit_and_keeps_dtype():
    pop = _pop(4, 6, dtype=jnp.bfloat16)
    kw = dict(individual_rate=0.5, gene_rate=0.5, sigma=0.1)
    a, ma = _call(gaussian_mutation, True, jax.random.PRNGKey(5), pop, **kw)
    b, mb = _call(gaussian_mutation, False, jax.random.PRNGKey(5), pop, **kw)
    np.testing.assert_array_equal(np.asarray(ma), np.asarray(mb))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-2, atol=1e-2)


def test_gaussian_draw_of_an_individual_does_not_depend_on_population_size():
    pop = _pop(5, 8)
    small = jax.tree_util.tree_map(lambda a: a[:3], pop)
    kw = dict(individual_rate=0.7, gene_rate=0.3, sigma=0.2)
    a, _ = gaussian_mutation(jax.random.PRNGKey(6), pop, **kw)
    b, _ = gaussian_mutation(jax.random.PRNGKey(6), small, **kw)
    np.testing.assert_array_equal(_flat(a)[:3], _flat(b))


# ---- SVD-subspace mutation ----

def _dense(pop, m, i):
    return np.asarray(pop[m]["B"][i], np.float64) @ np.asarray(pop[m]["A"][i], np.float64)


@JIT
def test_svd_mutation_stays_in_the_singular_subspaces(jit):
    pop = _pop(6, 6)
    out, mutated = _call(svd_mutation, jit, jax.random.PRNGKey(7), pop, individual_rate=1.0, gene_rate=1.0,
                         sigma=0.3)
    assert np.all(np.asarray(mutated))
    for m in pop:
        for i in range(6):
            w, w2 = _dense(pop, m, i), _dense(out, m, i)
            u, s, vt = np.linalg.svd(w)
            r = 4
            ur, vr = u[:, :r], vt[:r].T
            delta = w2 - w
            assert np.linalg.norm(delta) > 1e-3 * np.linalg.norm(w)  # it did change
            # the change lives in span(U_r) x span(V_r)
            np.testing.assert_allclose(delta - ur @ ur.T @ delta @ vr @ vr.T, 0, atol=2e-4 * np.linalg.norm(w))
            # diagonal of the core: S_i (1 + sigma E_ii) -- sign-invariant, so comparable to numpy's SVD
            core = ur.T @ w2 @ vr
            e_diag = (np.diag(core) / s[:r] - 1) / 0.3
            assert np.all(np.abs(e_diag) < 6)


def test_svd_mutation_magnitude_matches_definition():
    """E||ΔW' - ΔW||_F^2 = sigma^2 * gene_rate * (sum_i S_i)^2, estimated over many copies of one individual."""
    base = _pop(7, 1, r=4, d_in=20, d_out=12, modules=("m",))
    p, sigma, g = 600, 0.2, 0.5
    pop = jax.tree_util.tree_map(lambda a: jnp.repeat(a, p, axis=0), base)
    out, mutated = svd_mutation(jax.random.PRNGKey(8), pop, individual_rate=1.0, gene_rate=g, sigma=sigma)
    w = _dense(base, "m", 0)
    s = np.linalg.svd(w, compute_uv=False)[:4]
    want = sigma**2 * g * s.sum() ** 2
    got = np.mean([np.linalg.norm(_dense(out, "m", i) - w) ** 2 for i in range(p)])
    assert abs(got / want - 1) < 0.15, (got, want)


def test_svd_mutation_never_grows_the_rank_and_keeps_unpicked_exactly():
    pop = _pop(8, 40, r=4)
    # individual-level zero padding: effective rank 2 (as population.py pads lower ranks)
    pop = {m: {"A": v["A"].at[:, 2:, :].set(0.0), "B": v["B"].at[:, :, 2:].set(0.0)} for m, v in pop.items()}
    out, mutated = svd_mutation(jax.random.PRNGKey(9), pop, individual_rate=0.5, gene_rate=1.0, sigma=0.5)
    mutated = np.asarray(mutated)
    assert 5 < mutated.sum() < 35
    for i in range(40):
        for m in pop:
            if mutated[i]:
                assert np.linalg.matrix_rank(_dense(out, m, i), tol=1e-4) <= 2
            else:
                np.testing.assert_array_equal(np.asarray(out[m]["A"][i]), np.asarray(pop[m]["A"][i]))
                np.testing.assert_array_equal(np.asarray(out[m]["B"][i]), np.asarray(pop[m]["B"][i]))


def test_svd_mutation_sigma_zero_is_identity():
    pop = _pop(9, 4)
    out, mutated = svd_mutation(jax.random.PRNGKey(0), pop, individual_rate=1.0, gene_rate=1.0, sigma=0.0)
    assert not np.any(np.asarray(mutated))
    np.testing.assert_array_equal(_flat(out), _flat(pop))


@JIT
def test_gaussian_draws_are_the_documented_per_individual_stream(jit):
    """Individual i draws from split(split(key, P)[i]) = (pick key, gene key): one uniform u per gene over its
    concatenated leaves; a gene of a picked individual mutates when u < gene_rate, by sigma * ndtri(u / gene_rate)
    (scipy's ndtri here). The in-place loop that draws only for picked individuals must give exactly this."""
    from scipy.special import ndtri as np_ndtri

    p, ind_rate, gene_rate, sigma = 12, 0.5, 0.25, 0.05
    pop = _pop(7, p, r=3, d_in=10, d_out=5)
    key = jax.random.PRNGKey(11)
    out, mutated = _call(gaussian_mutation, jit, key, pop, individual_rate=ind_rate, gene_rate=gene_rate,
                         sigma=sigma)
    x, y = _flat(pop), _flat(out)
    want = x.copy()
    for i, k in enumerate(jax.random.split(key, p)):
        k_ind, k_genes = jax.random.split(k)
        if not bool(jax.random.bernoulli(k_ind, ind_rate)):
            continue
        u = np.asarray(jax.random.uniform(k_genes, (x.shape[1],), jnp.float32), np.float64)
        m = u < gene_rate
        want[i, m] = x[i, m] + sigma * np_ndtri(np.clip(u[m] / gene_rate, 1e-7, 1 - 1e-7))
    picked = (want != x).any(axis=1)
    assert 0 < picked.sum() < p
    np.testing.assert_array_equal(np.asarray(mutated), picked)
    np.testing.assert_array_equal(y[~picked], x[~picked])
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gene_rate", [0.01, 0.2], ids=["sparse", "dense-fallback"])
def test_gaussian_large_parts_match_definition(gene_rate):
    """Parts of >= SPARSE_MIN_GENES genes draw the mutated positions by geometric gaps (capped at G // 32, so 1%
    is drawn sparsely and 20% overflows the cap and falls back to one uniform per gene). Either way: genes mutate
    with probability gene_rate, evenly over positions (first vs second half, and across leaves), and by N(0, sigma^2)."""
    from genome_jax.operators.mutation import SPARSE_MIN_GENES, _sparse_cap

    p, sigma = 200, 0.05
    pop = _pop(3, p, r=4, d_in=256, d_out=256, modules=("m",))  # 2048 + 1024 genes per individual
    g = 4 * 256 + 256 * 4
    assert g >= SPARSE_MIN_GENES and _sparse_cap(g) and _sparse_cap(g) < 0.2 * g
    out, mutated = _call(gaussian_mutation, True, jax.random.PRNGKey(8), pop, individual_rate=1.0,
                         gene_rate=gene_rate, sigma=sigma)
    x, y = _flat(pop), _flat(out)
    changed = y != x
    np.testing.assert_array_equal(np.asarray(mutated), changed.any(axis=1))
    n = changed.size
    sd = np.sqrt(n * gene_rate * (1 - gene_rate))
    assert abs(changed.sum() - n * gene_rate) < 4 * sd
    half = g // 2  # positions: no drift along the walk (each half holds half the mutations)
    a, b = changed[:, :half].sum(), changed[:, half:].sum()
    assert abs(a - b) < 4 * np.sqrt(a + b)
    adj = (changed[:, 1:] & changed[:, :-1]).sum()  # neighbours both mutated: rate^2 (gaps of 1 occur)
    want = p * (g - 1) * gene_rate ** 2
    assert abs(adj - want) < 4 * np.sqrt(want) + 1
    per_ind = changed.sum(axis=1)  # Binomial(g, rate) per individual: its variance, not a constant count
    assert 0.6 < per_ind.var() / (g * gene_rate * (1 - gene_rate)) < 1.5
    d = (y - x)[changed]
    assert abs(d.mean()) < 4 * sigma / np.sqrt(d.size)
    assert abs(d.std() / sigma - 1) < 4 / np.sqrt(2 * d.size)
    kurt = np.mean((d / d.std()) ** 4)  # Gaussian: 3
    assert abs(kurt - 3) < 4 * np.sqrt(24 / d.size)


def test_sparse_draw_is_complete_within_its_cap_only():
    """The sparse draw reports whether its cap covered every mutated gene: at 1% it does (and its changes sit at
    distinct positions with N(0, sigma^2) values); at 20% it cannot, so the caller draws densely."""
    from genome_jax.operators.mutation import _sparse_cap, _sparse_genes

    g = 4096
    cap = _sparse_cap(g)
    keys = jax.random.split(jax.random.PRNGKey(9), 300)
    run = jax.jit(jax.vmap(lambda k, r: _sparse_genes(k, g, cap, gene_rate=r, sigma=0.1)), static_argnums=())
    d, changed, complete = run(keys, jnp.full((300,), 0.01))
    assert np.asarray(complete).all() and np.asarray(changed).all()
    d = np.asarray(d)
    assert abs((d != 0).sum() - 300 * g * 0.01) < 4 * np.sqrt(300 * g * 0.01)
    assert abs(d[d != 0].std() / 0.1 - 1) < 0.05
    _, _, complete = run(keys, jnp.full((300,), 0.2))
    assert not np.asarray(complete).any()
    d, changed, complete = run(keys, jnp.zeros((300,)))  # rate 0: nothing, and complete
    assert np.asarray(complete).all() and not np.asarray(changed).any() and not np.asarray(d).any()
