"""Merge methods against independent references: peft.utils.merge_utils (ties, dare_*, magnitude_prune, task
arithmetic; with normalize="count", PEFT's semantics) on the same tensors and masks, numpy written from each paper's definition for the rest, and the dense
truncated SVD for delta space. Also: vmapped crossover == a Python loop of single-child merges, jit and no-jit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils import merge_utils as mu

from genome_jax.errors import UserError
from genome_jax.operators import delta_space
from genome_jax.operators.merge import METHODS, MergeConfig, crossover, merge_one, parent_cuts

P, R, D_IN, D_OUT = 6, 4, 40, 24
IDX = np.array([[0, 1], [2, 3], [4, 5], [1, 4]], np.int32)
W = np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.9, 0.2]], np.float32)
KEY = jax.random.key(7)


def _factors(seed=0, P=P, modules=("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")):
    rng = np.random.default_rng(seed)
    return {m: {"A": jnp.asarray(rng.standard_normal((P, R, D_IN)), jnp.float32),
                "B": jnp.asarray(rng.standard_normal((P, D_OUT, R)), jnp.float32)} for m in modules}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _child_keys(key, C):
    return jax.random.split(key, C)


def _t(x):
    return torch.from_numpy(np.array(x))


# ---------------------------------------------------------------------------------------------- against PEFT
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_ties_equals_peft(msm):
    f = _factors()
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method="ties", density=0.3, majority_sign_method=msm,
                                                       normalize="count"))
    for x, y in zip(_leaves(f), _leaves(out)):
        for c in range(len(IDX)):
            expect = mu.ties([_t(x[i]) for i in IDX[c]], _t(W[c]), 0.3, msm).numpy()
            np.testing.assert_allclose(y[c], expect, rtol=1e-6, atol=1e-7)


def test_magnitude_prune_and_task_arithmetic_equal_peft():
    f = _factors(1)
    mp = crossover(KEY, f, IDX, W, config=MergeConfig(method="magnitude_prune", density=0.25, normalize="count"))
    ta = crossover(KEY, f, IDX, W, config=MergeConfig(method="task_arithmetic", normalize="count"))
    for x, y, z in zip(_leaves(f), _leaves(mp), _leaves(ta)):
        for c in range(len(IDX)):
            parents = [_t(x[i]) for i in IDX[c]]
            np.testing.assert_allclose(y[c], mu.magnitude_prune(parents, _t(W[c]), 0.25).numpy(), rtol=1e-6,
                                       atol=1e-7)
            np.testing.assert_allclose(z[c], mu.task_arithmetic(parents, _t(W[c])).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,msm", [("dare_linear", None), ("dare_ties", "total"), ("dare_ties", "frequency")])
def test_dare_equals_peft_with_the_same_masks(method, msm, monkeypatch):
    """PEFT draws its DARE masks with torch.bernoulli; we feed it our masks (jax.random.bernoulli under the key
    crossover documents for child c, leaf l) and compare."""
    density = 0.4
    f = _factors(2)
    cfg = MergeConfig(method=method, density=density, majority_sign_method=msm or "total", normalize="count")
    out = crossover(KEY, f, IDX, W, config=cfg)
    ckeys = _child_keys(KEY, len(IDX))
    for li, (x, y) in enumerate(zip(_leaves(f), _leaves(out))):
        for c in range(len(IDX)):
            mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(ckeys[c], li), density, (2,) + x.shape[1:]))
            queue = [torch.from_numpy(m.astype(np.float32)) for m in mask]
            monkeypatch.setattr(torch, "bernoulli", lambda p, _q=queue: _q.pop(0))
            parents = [_t(x[i]) for i in IDX[c]]
            if method == "dare_linear":
                expect = mu.dare_linear(parents, _t(W[c]), density)
            else:
                expect = mu.dare_ties(parents, _t(W[c]), density, msm)
            assert not queue  # PEFT asked for exactly one mask per parent
            np.testing.assert_allclose(y[c], expect.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- against numpy definitions
def test_linear_is_the_weighted_average():
    f = _factors(3)
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method="linear"))
    for x, y in zip(_leaves(f), _leaves(out)):
        for c in range(len(IDX)):
            expect = (W[c][:, None, None] * x[IDX[c]]).sum(0) / W[c].sum()
            np.testing.assert_allclose(y[c], expect, rtol=1e-5, atol=1e-6)


def test_normalize_weight_divides_sum_methods_by_the_weight_sum():
    f = _factors(3)
    a = crossover(KEY, f, IDX, W, config=MergeConfig(method="task_arithmetic", scale=2.0, normalize="weight"))
    for x, y in zip(_leaves(f), _leaves(a)):
        for c in range(len(IDX)):
            expect = 2.0 * (W[c][:, None, None] * x[IDX[c]]).sum(0) / W[c].sum()
            np.testing.assert_allclose(y[c], expect, rtol=1e-5, atol=1e-6)


def _breadcrumbs_numpy(x, w, density, gamma):
    """mergekit magnitude_outliers from its definition: drop the n_top largest, keep the next n_keep."""
    out = np.zeros(x.shape[1:], np.float64)
    for k in range(x.shape[0]):
        flat = x[k].ravel()
        n = flat.size
        keep_n, top = int(density * n), int(gamma * n)
        top = min(top, n - keep_n)
        order = np.argsort(-np.abs(flat), kind="stable")
        mask = np.zeros(n, bool)
        mask[order[top:top + keep_n]] = True
        out += w[k] * np.where(mask, flat, 0).reshape(x.shape[1:])
    return out / w.sum()  # mergekit normalize=true


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_breadcrumbs_equals_definition(gamma):
    f = _factors(4)
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method="breadcrumbs", density=0.3, gamma=gamma))
    for x, y in zip(_leaves(f), _leaves(out)):
        for c in range(len(IDX)):
            np.testing.assert_allclose(y[c], _breadcrumbs_numpy(x[IDX[c]], W[c], 0.3, gamma), rtol=1e-5, atol=1e-6)


def _slerp_numpy(t, v0, v1, eps=1e-8, thr=0.9995):
    """Shoemake's slerp as mergekit applies it per tensor."""
    u0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > eps else v0
    u1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > eps else v1
    dot = np.sum(u0 * u1)
    if abs(dot) > thr:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return np.sin(th - th * t) / np.sin(th) * v0 + np.sin(th * t) / np.sin(th) * v1


@pytest.mark.parametrize("t", [None, 0.25])
def test_slerp_equals_definition(t):
    f = _factors(5)
    # child 3 merges a parent with a near copy of itself: the lerp branch
    f = jax.tree_util.tree_map(lambda a: a.at[4].set(a[1] * 1.001), f)
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method="slerp", t=t))
    for x, y in zip(_leaves(f), _leaves(out)):
        for c in range(len(IDX)):
            tc = t if t is not None else W[c, 1] / W[c].sum()
            expect = _slerp_numpy(tc, x[IDX[c, 0]].astype(np.float64), x[IDX[c, 1]].astype(np.float64))
            np.testing.assert_allclose(y[c], expect, rtol=2e-5, atol=2e-6)


def test_blx_alpha_equals_definition_and_leaves_the_interval():
    f = _factors(6)
    alpha = 0.5
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method="blx_alpha", alpha=alpha))
    ckeys = _child_keys(KEY, len(IDX))
    outside = 0
    for li, (x, y) in enumerate(zip(_leaves(f), _leaves(out))):
        for c in range(len(IDX)):
            lo, hi = x[IDX[c]].min(0), x[IDX[c]].max(0)
            d = hi - lo
            u = np.asarray(jax.random.uniform(jax.random.fold_in(ckeys[c], li), lo.shape))
            np.testing.assert_allclose(y[c], lo - alpha * d + u * (1 + 2 * alpha) * d, rtol=1e-5, atol=1e-6)
            assert np.all(y[c] >= lo - alpha * d - 1e-5) and np.all(y[c] <= hi + alpha * d + 1e-5)
            outside += np.sum((y[c] < lo) | (y[c] > hi))
    assert outside > 0.3 * sum(x[0].size for x in _leaves(f)) * len(IDX)  # expected fraction 0.5 for alpha = 0.5


def test_uniform_copies_each_gene_from_a_parent_in_proportion_to_the_weights():
    f = _factors(7, P=2)
    idx = np.array([[0, 1]] * 8, np.int32)
    w = np.array([[0.8, 0.2]] * 8, np.float32)
    out = crossover(KEY, f, idx, w, config=MergeConfig(method="uniform"))
    from_first = total = 0
    for x, y in zip(_leaves(f), _leaves(out)):
        is0, is1 = y == x[0][None], y == x[1][None]
        assert np.all(is0 | is1)
        from_first += is0.sum()
        total += y.size
    assert abs(from_first / total - 0.8) < 0.02  # ~16k genes: 0.8 +- 3 sigma


# ----------------------------------------------------------------------------- crossover vs single-child loop
@pytest.mark.parametrize("method,jit", [(m, True) for m in METHODS] +
                         [(m, False) for m in ("ties", "dare_ties", "slerp", "breadcrumbs")],
                         ids=lambda v: v if isinstance(v, str) else ("jit" if v else "nojit"))
def test_crossover_equals_loop_of_merge_one(method, jit):
    f = _factors(8)
    cfg = MergeConfig(method=method, density=0.5)
    if jit:
        out = crossover(KEY, f, IDX, W, config=cfg)
    else:
        with jax.disable_jit():
            out = crossover(KEY, f, IDX, W, config=cfg)
    ckeys = _child_keys(KEY, len(IDX))
    for c in range(len(IDX)):
        one = merge_one(ckeys[c], jax.tree_util.tree_map(lambda a: a[IDX[c]], f), jnp.asarray(W[c]), config=cfg)
        for y, z in zip(_leaves(out), _leaves(one)):
            np.testing.assert_allclose(y[c], z, rtol=1e-5, atol=1e-6, err_msg=f"{method} child {c}")


def test_cuts_are_computed_once_per_parent_and_reused():
    f = _factors(9)
    cfg = MergeConfig(method="ties", density=0.2)
    cuts = parent_cuts(f, cfg)
    for x, cut in zip(_leaves(f), _leaves(cuts)):
        flat = np.abs(x.reshape(P, -1))
        k = int(0.2 * flat.shape[1])
        np.testing.assert_array_equal(cut, -np.sort(-flat, axis=1)[:, k - 1])
    a = crossover(KEY, f, IDX, W, config=cfg, cuts=cuts)
    b = crossover(KEY, f, IDX, W, config=cfg)
    for y, z in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(y, z)


@pytest.mark.parametrize("kernel,select", [("pallas_interpret", "auto"), ("jnp", "jnp")])
def test_ties_kernel_and_select_backends_agree(kernel, select):
    f = _factors(10)
    base = crossover(KEY, f, IDX, W, config=MergeConfig(method="ties", density=0.3, kernel="jnp"))
    other = crossover(KEY, f, IDX, W, config=MergeConfig(method="ties", density=0.3, kernel=kernel, select=select))
    for y, z in zip(_leaves(base), _leaves(other)):
        np.testing.assert_array_equal(y, z)


def test_three_parents():
    f = _factors(11)
    idx = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    w = np.array([[0.2, 0.3, 0.5], [1.0, 1.0, 1.0]], np.float32)
    out = crossover(KEY, f, idx, w, config=MergeConfig(method="ties", density=0.3, normalize="count"))
    for x, y in zip(_leaves(f), _leaves(out)):
        for c in range(2):
            expect = mu.ties([_t(x[i]) for i in idx[c]], _t(w[c]), 0.3).numpy()
            np.testing.assert_allclose(y[c], expect, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------------------- delta space
def _dense(f, path, i):
    return np.asarray(f[path]["B"][i], np.float64) @ np.asarray(f[path]["A"][i], np.float64)


def _best_rank(M, r):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_delta_linear_merge_equals_truncated_svd_of_dense_dw(method):
    f = _factors(12)
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method=method, space="delta", scale=1.5, normalize="count"))
    for path in f:
        for c in range(len(IDX)):
            coeff = W[c] / W[c].sum() if method == "linear" else 1.5 * W[c]
            dense = sum(coeff[k] * _dense(f, path, IDX[c, k]) for k in range(2))
            got = np.asarray(out[path]["B"][c], np.float64) @ np.asarray(out[path]["A"][c], np.float64)
            np.testing.assert_allclose(got, _best_rank(dense, R), rtol=0, atol=2e-4 * np.abs(dense).max())


def test_delta_slerp_is_slerp_of_the_dense_updates():
    f = _factors(13)
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method="slerp", space="delta"))
    for path in f:
        for c in range(len(IDX)):
            t = W[c, 1] / W[c].sum()
            dense = _slerp_numpy(t, _dense(f, path, IDX[c, 0]), _dense(f, path, IDX[c, 1]))
            got = np.asarray(out[path]["B"][c], np.float64) @ np.asarray(out[path]["A"][c], np.float64)
            np.testing.assert_allclose(got, _best_rank(dense, R), rtol=0, atol=2e-4 * np.abs(dense).max())


@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_delta_ties_exact_svd_equals_peft_ties_on_dense_dw_then_truncation(msm):
    f = _factors(14)
    out = crossover(KEY, f, IDX, W, config=MergeConfig(method="ties", density=0.3, majority_sign_method=msm,
                                                       space="delta", svd="exact", normalize="count"))
    for path in f:
        for c in range(len(IDX)):
            dense = [torch.from_numpy(_dense(f, path, i).astype(np.float32)) for i in IDX[c]]
            merged = mu.ties(dense, _t(W[c]), 0.3, msm).numpy().astype(np.float64)
            got = np.asarray(out[path]["B"][c], np.float64) @ np.asarray(out[path]["A"][c], np.float64)
            np.testing.assert_allclose(got, _best_rank(merged, R), rtol=0, atol=2e-4 * np.abs(merged).max())


def test_delta_randomized_svd_is_near_optimal():
    f = _factors(15)
    cfg = MergeConfig(method="ties", density=0.3, space="delta", svd="randomized", power_iters=2, normalize="count")
    out = crossover(KEY, f, IDX, W, config=cfg)
    for path in f:
        for c in range(len(IDX)):
            dense = [torch.from_numpy(_dense(f, path, i).astype(np.float32)) for i in IDX[c]]
            merged = mu.ties(dense, _t(W[c]), 0.3).numpy().astype(np.float64)
            got = np.asarray(out[path]["B"][c], np.float64) @ np.asarray(out[path]["A"][c], np.float64)
            best = np.linalg.norm(merged - _best_rank(merged, R))
            assert np.linalg.norm(merged - got) <= 1.05 * best + 1e-6


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_delta_blocks_do_not_change_the_result(method):
    """child_chunk only bounds memory: chunks of 3 children (padded: C = 4) and 2 parents (padded: P = 6 is not a
    multiple of 4) give the same children as one block."""
    f = _factors(16)
    one = crossover(KEY, f, IDX, W, config=MergeConfig(method=method, density=0.4, space="delta", child_chunk=16))
    blocks = crossover(KEY, f, IDX, W, config=MergeConfig(method=method, density=0.4, space="delta", child_chunk=3))
    cuts4 = parent_cuts(f, MergeConfig(method="ties", density=0.4, space="delta", child_chunk=4))
    cuts16 = parent_cuts(f, MergeConfig(method="ties", density=0.4, space="delta", child_chunk=16))
    for y, z in zip(_leaves(one), _leaves(blocks)):
        np.testing.assert_allclose(y, z, rtol=1e-5, atol=1e-6)
    for y, z in zip(_leaves(cuts4), _leaves(cuts16)):
        np.testing.assert_array_equal(y, z)


def test_lowrank_combine_pads_when_the_core_is_small():
    A = jnp.ones((2, 3, 2), jnp.float32)  # K r = 6 > d_in = 2: the core is 2 x 2
    B = jnp.ones((2, 5, 3), jnp.float32)
    An, Bn = delta_space.lowrank_combine(A, B, jnp.array([1.0, 1.0]), 3)
    assert An.shape == (3, 2) and Bn.shape == (5, 3)
    np.testing.assert_allclose(np.asarray(Bn @ An), np.full((5, 2), 6.0), rtol=1e-5)


# ------------------------------------------------------------------------------------------------- bad input
def test_config_errors_name_the_culprit():
    with pytest.raises(UserError, match="method.*nope"):
        MergeConfig(method="nope")
    with pytest.raises(UserError, match="density"):
        MergeConfig(density=0.0)
    with pytest.raises(UserError, match="normalize"):
        MergeConfig(normalize="mean")
    with pytest.raises(UserError, match="space"):
        MergeConfig(space="weights")
    with pytest.raises(UserError, match="slerp merges exactly 2"):
        crossover(KEY, _factors(), np.zeros((2, 3), np.int32), np.ones((2, 3), np.float32),
                  config=MergeConfig(method="slerp"))
    with pytest.raises(UserError, match=r"\(C, K\)"):
        crossover(KEY, _factors(), np.zeros((2, 2), np.int32), np.ones((2, 3), np.float32))


def test_config_is_hashable_and_records_as_a_dict():
    import dataclasses

    cfg = MergeConfig(method="dare_ties", density=0.5)
    assert hash(cfg) == hash(MergeConfig(method="dare_ties", density=0.5))
    assert dataclasses.asdict(cfg)["method"] == "dare_ties"
