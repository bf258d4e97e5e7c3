"""Per-parent magnitude cuts, computed once per generation and reused by every child.

Trimming in TIES / magnitude pruning / breadcrumbs depends only on the parent tensor, not on the child, so
`parent_cuts` computes, for every individual and every tensor (each A and each B separately, as PEFT and mergekit
trim per tensor), the exact k-th largest magnitude with k = int(density * numel) (PEFT's and mergekit's count).
Children then trim with `|x| >= cut` (exactly the top-k entries; entries tied with the k-th value are kept too, a
measure-zero event for float weights, where PEFT's top_k would break the tie arbitrarily).

    cuts = parent_cuts(factors, method="ties", density=0.2)      # same tree as factors, leaves (P,) or (P, 2)

Backends (kernels.threshold): on CPU the native radix select (one XLA FFI call per tensor); elsewhere the jnp
counting select, run once per group of equally long tensors (concatenated) so the program holds a few while loops,
not one per tensor (420 loops took ~10 min to compile).
"""
from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp

from kernels import threshold as kthr

__all__ = ["CUT_METHODS", "cut_ranks", "parent_cuts", "tensor_cuts"]

# methods that trim by magnitude, and how many cuts each needs per tensor
CUT_METHODS = {"ties": 1, "magnitude_prune": 1, "breadcrumbs": 2}


def cut_ranks(n: int, method: str, density: float, gamma: float = 0.0) -> tuple[int, ...]:
    """The k's whose k-th largest magnitude a method needs, for a tensor of n entries.

    ties / magnitude_prune: (int(density n),). breadcrumbs (mergekit `magnitude_outliers`): (n_top, n_top + n_keep)
    with n_keep = int(density n), n_top = int(gamma n), n_top reduced if n_top + n_keep > n; an entry is kept when
    its magnitude rank (1 = largest) lies in (n_top, n_top + n_keep].
    """
    keep = kthr.keep_count(n, density)
    if method in ("ties", "magnitude_prune"):
        return (keep,)
    if method == "breadcrumbs":
        top = int(gamma * n)
        top = min(top, n - keep)
        return (top, top + keep)
    raise ValueError(f"{method} does not trim by magnitude")


def tensor_cuts(x, method: str, density: float, gamma: float = 0.0, *, impl: str = "auto", needed=None) -> jax.Array:
    """Cuts of one stack of tensors x (S, ...): (S,) for ties / magnitude_prune, (S, 2) for breadcrumbs.

    needed: optional (S,) bool; on the native path rows not needed are skipped (their cut is +inf)."""
    S = x.shape[0]
    flat = x.reshape(S, -1)
    ks = cut_ranks(flat.shape[1], method, density, gamma)
    if needed is not None and kthr.resolve_impl(impl) == "native":
        ks = [jnp.where(needed, k, 0) for k in ks]  # k = 0: the kernel returns at once
    cols = [kthr.magnitude_cut(flat, k, impl=impl) for k in ks]
    return cols[0] if len(cols) == 1 else jnp.stack(cols, axis=1)


def parent_cuts(factors, method: str, density: float, gamma: float = 0.0, *, impl: str = "auto", needed=None):
    """Cuts for every individual and tensor: a tree like `factors` with leaves (P,) (or (P, 2) for breadcrumbs).

    factors: any pytree whose leaves are (P, ...) stacks (the population's {path: {"A", "B"}}). needed: optional
    (P,) bool, the individuals that are parents this generation; the native select skips the others (cut +inf)."""
    if method not in CUT_METHODS:
        raise ValueError(f"{method} does not trim by magnitude")
    leaves, treedef = jax.tree_util.tree_flatten(factors)
    impl = kthr.resolve_impl(impl)
    if impl == "native":  # one FFI call per tensor: rows are selected in cache, nothing is copied
        return treedef.unflatten([tensor_cuts(x, method, density, gamma, impl="native", needed=needed)
                                  for x in leaves])
    # jnp: group equally long tensors so each group is one (rows, n) select (one while loop per group)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, x in enumerate(leaves):
        groups[x[0].size].append(i)
    out: list = [None] * len(leaves)
    for n, members in groups.items():
        ks = cut_ranks(n, method, density, gamma)
        rows = jnp.concatenate([leaves[i].reshape(leaves[i].shape[0], n) for i in members], axis=0)
        cols = [kthr.magnitude_cut(rows, k, impl="jnp") for k in ks]
        stacked = cols[0] if len(cols) == 1 else jnp.stack(cols, axis=1)
        start = 0
        for i in members:
            P = leaves[i].shape[0]
            out[i] = stacked[start:start + P]
            start += P
    return treedef.unflatten(out)
