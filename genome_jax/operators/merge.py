"""Crossover: merge methods as pure functions for ONE child, applied to a whole generation by `crossover`.

Every method is written for one child over a stack of its K parents' tensors and is vmapped over children:

    ties(key, x: (K, ...), weights: (K,), *, density, majority_sign_method, normalize, cuts=None) -> (...)
    crossover(key, factors, parent_idx: (C, K), weights: (C, K), *, config: MergeConfig) -> children (C, ...)

`crossover` gathers the parents of all C children, computes each parent's trim cuts once (operators.trim), vmaps
the single-child method over children and runs one jitted program per leaf (no Python loop over children; one
compile per distinct leaf shape). Child c uses the key `fold_in(split(key, C)[c], leaf_index)` for its leaf, so it
equals `merge_one(split(key, C)[c], ...)`.

Methods (x_k: parent tensors, w_k: weights) and the semantics they reproduce:
- linear: sum w_k x_k / sum w_k. mergekit `linear` (normalize=true).
- task_arithmetic: scale * sum w_k x_k (/ sum w_k under normalize="weight"). mergekit `task_arithmetic`
  (lambda=scale); PEFT `task_arithmetic` (normalize="count").
- ties: trim each x_k to its top-`density` magnitudes, elect a sign per entry, disjoint merge (see `normalize`).
  mergekit `ties` (normalize="weight", the default / "none"); PEFT `ties` (normalize="count").
- dare_linear: sum w_k m_k x_k / density, m_k ~ Bernoulli(density) per entry. PEFT `dare_linear` (rescale=True,
  normalize="count").
- dare_ties: the DARE drop + rescale, then TIES election and disjoint merge. PEFT `dare_ties` (normalize="count").
- magnitude_prune: sum w_k trim(x_k). PEFT `magnitude_prune` (normalize="count").
- breadcrumbs: sum w_k x_k restricted to magnitude ranks (n_top, n_top + n_keep], n_top = int(gamma n),
  n_keep = int(density n) (n_top shrinks if the two exceed n). mergekit `breadcrumbs` (`magnitude_outliers`),
  without its empty slice at gamma = 0.
- slerp: spherical interpolation of 2 parents at t (plain lerp when |cos| > 0.9995), per tensor. mergekit `slerp`;
  t=None takes t = w_1 / (w_0 + w_1).
- blx_alpha: each gene uniform in [min - alpha d, max + alpha d], d = max - min over the parents (BLX-alpha,
  Eshelman & Schaffer 1993: children can leave the parents' interval).
- uniform: each gene copied from parent k with probability w_k / sum w (uniform crossover).
`normalize` ("weight" | "count" | "none"): TIES-type methods divide by the agreeing weight (mergekit normalize=true,
the default; sign elected from weighted values), by the number of agreeing parents (PEFT; sign elected from
unweighted values), or not at all (mergekit normalize=false). For the sum-type methods (task_arithmetic, dare_linear,
magnitude_prune, breadcrumbs) "weight" divides by sum w_k (mergekit normalize=true) and "count"/"none" leave the sum
(PEFT). "weight" is the default because it preserves parents: merging an individual with itself (weights summing
to 1, nothing trimmed or dropped) returns it, under every method and in both spaces (tests/genome_jax/operators/
test_merge_identity.py). PEFT's "count" does not: K copies of one parent with weights summing to 1 come out divided
by K, so in factor space a 2-parent self-merge has A/2 and B/2 and a quarter of the parent's ΔW = B A.
`rescale` (DARE): divide kept entries by density (PEFT; mergekit's newer default rescales by the L1 norm instead).
All trimming is per tensor (each A and each B on its own), as PEFT and mergekit do it; k = int(density * numel).

Weights are applied to each factor as given. PEFT's `add_weighted_adapter` instead passes sqrt(w * scaling) for
both A and B; to reproduce it, pass sqrt(w) (our scaling is already folded into B).

Names, defaults and constants live in operators.registry; the single-child functions in operators.methods.
Spaces: space="factors" merges A and B separately (GENOME, PEFT's non-SVD modes; cheap). space="delta" merges the
updates dW_k = B_k A_k and returns the best rank-r factors (operators.delta_space).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from genome_jax.errors import UserError
from genome_jax.operators import delta_space
from genome_jax.operators import trim as trim_ops
from genome_jax.operators.methods import (blx_alpha, breadcrumbs, dare_linear, dare_ties, linear, magnitude_prune,
                                          merge_tensor, slerp, task_arithmetic, ties, uniform)
from genome_jax.operators.registry import METHODS, SPACES, MergeConfig
from kernels import ties as kties

__all__ = [
    "METHODS",
    "SPACES",
    "MergeConfig",
    "breadcrumbs",
    "blx_alpha",
    "crossover",
    "dare_linear",
    "dare_ties",
    "linear",
    "magnitude_prune",
    "merge_one",
    "merge_tensor",
    "parent_cuts",
    "slerp",
    "task_arithmetic",
    "ties",
    "uniform",
]


# -------------------------------------------------------------------------------------------------- generations
def parent_cuts(factors, config: MergeConfig, needed=None):
    """Per-parent trim cuts for every tensor (None when the method does not trim by magnitude). Compute once per
    generation and pass to `crossover(..., cuts=)` to reuse across calls; `crossover` computes them otherwise.
    needed: optional (P,) bool of this generation's parents (others may be skipped: cut +inf)."""
    if config.cut_method is None:
        return None
    if config.space == "delta":
        return delta_space.delta_cuts(factors, config)
    return trim_ops.parent_cuts(factors, config.cut_method, config.density, config.gamma, impl=config.select,
                                needed=needed)


def _check_parents(parent_idx, weights, config: MergeConfig):
    if parent_idx.ndim != 2 or weights.shape != parent_idx.shape:
        raise UserError(f"crossover: parent_idx {parent_idx.shape} and weights {weights.shape} must both be (C, K)")
    need = config.spec.parents
    if need is not None and parent_idx.shape[1] != need:
        raise UserError(f"{config.method} merges exactly {need} parents per child, got K={parent_idx.shape[1]}")


def merge_one(key, parents, weights, *, config: MergeConfig = MergeConfig(), cuts=None):
    """One child from its K parents: parents is a pytree with leaves (K, ...), weights (K,). Leaf l uses the key
    fold_in(key, l). cuts: a tree like parents with the parents' cuts (computed here when None)."""
    if config.space == "delta":
        return delta_space.merge_one_delta(key, parents, weights, config=config, cuts=cuts)
    leaves, treedef = jax.tree_util.tree_flatten(parents)
    cut_leaves = treedef.flatten_up_to(cuts) if cuts is not None else [None] * len(leaves)
    out = [merge_tensor(jax.random.fold_in(key, li), x, weights, config, c)
           for li, (x, c) in enumerate(zip(leaves, cut_leaves))]
    return treedef.unflatten(out)


def crossover(key, factors, parent_idx, weights, *, config: MergeConfig = MergeConfig(), cuts=None):
    """A generation of C children: child c merges individuals parent_idx[c] (K of them) with weights[c].

    factors: pytree of (P, ...) stacks (Population.factors); parent_idx (C, K) int; weights (C, K) float.
    Returns a pytree of (C, ...) stacks. Trim cuts are computed once per parent (or taken from `cuts`, see
    `parent_cuts`) and shared by all children; vmaps over children.
    One jitted program per distinct leaf shape (`config` static, the leaf index traced), called once per leaf: the
    compile cost does not grow with the number of layers (one program over a whole SmolLM2 tree, 420 leaves, took
    about a minute of XLA:CPU compile). Traceable, so it also runs inside a caller's jit.
    """
    parent_idx = jnp.asarray(parent_idx, jnp.int32)
    weights = jnp.asarray(weights, jnp.float32)
    _check_parents(parent_idx, weights, config)
    if config.space == "delta":
        return delta_space.crossover_delta(key, factors, parent_idx, weights, config=config, cuts=cuts)
    leaves, treedef = jax.tree_util.tree_flatten(factors)
    cut_leaves = treedef.flatten_up_to(cuts) if cuts is not None else [None] * len(leaves)
    child_keys = _split_keys(key, parent_idx.shape[0])
    out = [_crossover_leaf(child_keys, jnp.int32(li), x, parent_idx, weights, cut, config=config)
           for li, (x, cut) in enumerate(zip(leaves, cut_leaves))]
    return treedef.unflatten(out)


@functools.partial(jax.jit, static_argnums=(1,))
def _split_keys(key, n: int):
    return jax.random.split(key, n)


@functools.partial(jax.jit, static_argnames=("config",))
def _crossover_leaf(child_keys, li, x, parent_idx, weights, cut, *, config: MergeConfig):
    """Leaf `li` (x: (P, ...)) of every child: (C, ...). Child c's key is fold_in(child_keys[c], li); cut: the
    parents' cuts of this leaf, (P,) / (P, 2), or None (computed here for the parents in parent_idx)."""
    C, K = parent_idx.shape
    P = x.shape[0]
    if cut is None and config.cut_method is not None:
        needed = jnp.zeros((P,), bool).at[parent_idx.reshape(-1)].set(True)
        cut = trim_ops.tensor_cuts(x, config.cut_method, config.density, config.gamma, impl=config.select,
                                   needed=needed)
    kernel = config.kernel
    if kernel == "auto":
        kernel = "pallas" if jax.default_backend() == "gpu" else "jnp"
    if config.method == "ties" and kernel != "jnp":
        y = kties.ties_merge(x.reshape(P, -1), cut, parent_idx, weights,
                             majority_sign_method=config.majority_sign_method, normalize=config.normalize,
                             impl=kernel)
    else:
        # one row gather per parent slot: XLA fuses these into the merge (one (C, K, ...) gather did not fuse
        # and ran ~30x slower)
        gathered = jnp.stack([x[parent_idx[:, k]] for k in range(K)], axis=1)            # (C, K, ...)
        gcut = cut[parent_idx] if cut is not None else None                              # (C, K[, 2])
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(child_keys, li)

        def one(kc, xs, wc, cc):
            return merge_tensor(kc, xs, wc, config, cc)

        y = jax.vmap(one)(keys, gathered, weights, gcut)
    return y.reshape((C,) + x.shape[1:])
