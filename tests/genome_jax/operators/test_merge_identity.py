"""Crossover preserves its parents: merging an individual with K copies of itself, under weights that sum to 1 and
settings that trim or drop nothing, returns the same ΔW = B @ A, for every registered merge method in both spaces.

Reference: the parent's own ΔW in float64 numpy. The "count" case (PEFT's normalisation) is the negative control:
it divides each factor by K, so the test would catch the engine sliding back to it."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from genome_jax.operators.merge import METHODS, SPACES, MergeConfig, crossover
from genome_jax.strategies import make_strategy
from genome_jax.strategies.common import make_offspring

R, D_IN, D_OUT = 4, 40, 24
MODULES = ("model.layers.0.self_attn.q_proj",)
# rbg keys: the property holds whatever the random bits are, and XLA compiles them far faster on CPU than threefry
KEY = jax.random.key(11, impl="rbg")

# Per method: the settings under which it keeps every entry of every parent (density 1: TIES trims nothing, DARE
# keeps every entry and rescales by 1; breadcrumbs' top-gamma cut shrinks to 0 when density is 1). Every
# registered method must be listed: a new one fails test_every_method_is_covered until its case is thought about.
# blx_alpha and uniform are stochastic but still preserve identical parents (the interval is a point; every gene
# comes from a copy), so none is excluded.
SELF_MERGE: dict[str, dict] = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 1.0},
    "dare_linear": {"density": 1.0},
    "dare_ties": {"density": 1.0},
    "breadcrumbs": {"density": 1.0},
    "magnitude_prune": {"density": 1.0},
    "slerp": {},
    "blx_alpha": {},
    "uniform": {},
}
WEIGHTS = {2: [0.3, 0.7], 3: [0.2, 0.3, 0.5]}


def _factors(P=3, seed=0):
    rng = np.random.default_rng(seed)
    return {m: {"A": rng.standard_normal((P, R, D_IN)).astype(np.float32),
                "B": rng.standard_normal((P, D_OUT, R)).astype(np.float32)} for m in MODULES}


def _delta(leaf, i):
    return np.asarray(leaf["B"][i], np.float64) @ np.asarray(leaf["A"][i], np.float64)


def _self_merge(f, config: MergeConfig, K: int):
    """Child c = merge of K copies of individual c (weights WEIGHTS[K])."""
    P = next(iter(f.values()))["A"].shape[0]
    idx = np.repeat(np.arange(P, dtype=np.int32)[:, None], K, axis=1)
    w = np.tile(np.asarray(WEIGHTS[K], np.float32), (P, 1))
    return crossover(KEY, f, idx, w, config=config)


def test_every_method_is_covered():
    assert set(SELF_MERGE) == set(METHODS), f"add {set(METHODS) - set(SELF_MERGE)} to SELF_MERGE"


# every method in both spaces with 2 copies; 3 copies in factor space (delta space forms the copies' dense ΔW and
# runs the same single-child merge on them, so K only matters there through that shared code)
CASES = [(m, s, 2) for m in METHODS for s in SPACES] + [(m, "factors", 3) for m in METHODS if m != "slerp"]


@pytest.mark.parametrize("method,space,K", CASES, ids=[f"{m}-{s}-K{k}" for m, s, k in CASES])
def test_self_merge_returns_the_parent_delta(method, space, K):
    f = _factors()
    cfg = MergeConfig(method=method, space=space, **SELF_MERGE[method])
    out = _self_merge(f, cfg, K)
    for path, leaf in f.items():
        for c in range(leaf["A"].shape[0]):
            want = _delta(leaf, c)
            got = _delta(out[path], c)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(),
                                       err_msg=f"{method} {space} K={K} child {c} {path}")


@pytest.mark.parametrize("space,shrink", [("factors", 4.0), ("delta", 2.0)])
def test_peft_count_normalisation_shrinks_a_self_merge(space, shrink):
    """The bug this file guards against: with normalize="count" two copies come out as ΔW / 4 in factor space
    (A / 2 and B / 2) and ΔW / 2 in delta space."""
    f = _factors()
    out = _self_merge(f, MergeConfig(method="ties", density=1.0, normalize="count", space=space, svd="exact"), 2)
    for path, leaf in f.items():
        want = _delta(leaf, 0) / shrink
        np.testing.assert_allclose(_delta(out[path], 0), want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_engine_crossover_of_identical_parents_does_not_shrink(method):
    """The strategies' crossover (a method name given to make_strategy, engine defaults: density 0.2) on a population of
    copies of one individual: each surviving entry of a child keeps the parent's value (DARE: divided by the density,
    its rescaling); entries are trimmed or dropped, never shrunk by the number of parents."""
    one = _factors(P=1, seed=3)
    pop = jax.tree_util.tree_map(lambda a: np.repeat(a, 6, axis=0), one)
    strategy, params = make_strategy("genome", population_size=6, cross=method, cross_rate=1.0,
                                     individual_mutation_rate=0.0, n_parents=2)
    assert strategy.cross.normalize == "weight"
    children, _, _ = make_offspring(jax.random.key(5, impl="rbg"), pop, np.zeros(6, np.float32), 6, strategy, params,
                                    0)
    for (path, leaf), kid in zip(one.items(), (children[p] for p in one)):
        for name in ("A", "B"):
            parent, got = leaf[name][0], np.asarray(kid[name])
            kept = got != 0
            assert kept.any(), f"{method} {path}.{name}: everything trimmed"
            want = np.broadcast_to(parent, got.shape) / (strategy.cross.density if method == "dare_ties" else 1)
            np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6, err_msg=f"{method} {path}.{name}")


def test_config_default_is_the_parent_preserving_normalisation():
    assert MergeConfig().normalize == "weight"
    assert dataclasses.replace(MergeConfig(), method="ties").normalize == "weight"
