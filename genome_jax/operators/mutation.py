"""Mutation operators over a stacked population of LoRA factors.

Both operators take the whole population (any pytree whose leaves carry the individual on axis 0, e.g. the
`Population.factors` dict of `{"A": (P, r, d_in), "B": (P, d_out, r)}`), split the key once per individual and
map a per-individual function over the keys, so (with JAX's default partitionable threefry) an individual's draw
does not depend on the population size.

`gaussian_mutation`: GENOME's mutation. Each individual is picked with probability `individual_rate`; in a
picked individual every gene (every entry of every A and B) is picked with probability `gene_rate` and gets
N(0, sigma^2) noise added. Only picked individuals are drawn for: the mutated positions by their geometric gaps
when the part holds at least SPARSE_MIN_GENES genes (`_sparse_genes`: O(mutated genes) draws), else one uniform
per gene serving both the mask and the noise (`_gaussian_genes`). Non-picked genes are returned bit-for-bit
unchanged.

`svd_mutation`: noise shaped by the individual's own update. Per module, ΔW = B @ A = U diag(S) V^T is taken from
the small factors (QR of B and of A^T, SVD of the r x r core; ΔW itself is never formed), and a picked individual
becomes ΔW' = U diag(sqrt S) (I + sigma E) diag(sqrt S) V^T with E ~ N(0, 1) masked per entry by `gene_rate`.
So the change lives in span(U) x span(V), a direction i<->j is perturbed in proportion to sqrt(S_i S_j)
(sigma is relative: E||ΔW' - ΔW||_F^2 = sigma^2 gene_rate (sum_i S_i)^2), and the rank never grows (zero-padded
ranks stay zero). A mutated module comes back in the balanced form B' = U diag(sqrt S)(I + sigma E),
A' = diag(sqrt S) V^T; modules of individuals that are not picked keep their factors exactly.

`sigma` may be a float or an optax schedule (a callable of the generation count), evaluated at `step`.
Both return `(children, mutated)` where `mutated: (P,) bool` says whose weights actually changed.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

Schedule = Callable[[Any], Any]
ScalarOrSchedule = Union[float, Schedule]

__all__ = ["gaussian_mutation", "gaussian_mutation_picked", "pick_individuals", "resolve_schedule", "svd_mutation",
           "svd_mutation_picked"]


def resolve_schedule(value: ScalarOrSchedule, step) -> jax.Array:
    """A float, or an optax schedule evaluated at `step` (the generation count), as a float32 scalar."""
    v = value(step) if callable(value) else value
    return jnp.asarray(v, jnp.float32)


def _gaussian_genes(k_genes, n_genes: int, *, gene_rate, sigma):
    """One picked individual's additive change over its flattened genes: ((n_genes,) float32, changed: () bool).

    One uniform draw u per gene decides both things: the gene mutates when u < gene_rate, and then
    u / gene_rate ~ U(0, 1) gives the noise sigma * Phi^-1(u / gene_rate) ~ N(0, sigma^2), so
    the draw costs one random number per gene. (float32 uniforms have 2^-23 resolution, so the noise's tails are
    cut near |z| = 4.4 sigma at gene_rate 0.01; nothing else about the distribution changes.)
    """
    u = jax.random.uniform(k_genes, (n_genes,), jnp.float32)
    rate = jnp.asarray(gene_rate, jnp.float32)
    mask = u < rate  # gene_rate 0: never (u >= 0)
    z = ndtri(jnp.clip(u / jnp.maximum(rate, 1e-30), 1e-7, 1.0 - 1e-7))
    return jnp.where(mask, sigma * z, 0.0), jnp.any(mask) & (sigma != 0)


# Sparse draws: at GENOME's gene rates (0.01) a picked individual mutates ~1% of its genes, and one uniform per gene
# (threefry on CPU, ~10 ns each) was most of a generation's time. For a part with at least SPARSE_MIN_GENES genes the
# mutated positions are drawn as a Bernoulli(gene_rate) process by its geometric gaps, capped at n_genes // 32 of
# them (rates up to ~2.5% fit; 8 sd of headroom at 1%), so the cost is O(mutated genes); when the walk does not pass
# the end within the cap, the individual's genes are drawn densely instead.
SPARSE_MIN_GENES = 2048


def _sparse_cap(n_genes: int) -> int:
    """Static number of gaps drawn per individual by `_sparse_genes` (0: use the dense draw)."""
    cap = n_genes // 32
    if n_genes < SPARSE_MIN_GENES or cap * (n_genes + 1) >= 2 ** 31:  # positions are int32 cumulative sums
        return 0
    return cap


def _sparse_genes(key, n_genes: int, cap: int, *, gene_rate, sigma):
    """The mutated genes of one picked individual from `cap` geometric gaps: ((n_genes,) change, changed (),
    complete ()): complete is False when the cap-th mutated position is still inside the genes (more mutations
    than the cap), and the caller then draws densely."""
    k_gap, k_val = jax.random.split(key)
    rate = jnp.asarray(gene_rate, jnp.float32)
    u = 1.0 - jax.random.uniform(k_gap, (cap,), jnp.float32)  # (0, 1]
    # trials up to and including the next success of Bernoulli(rate): 1 + floor(log u / log(1 - rate))
    g = jnp.floor(jnp.log(u) / jnp.log1p(-rate)) + 1.0
    g = jnp.where(jnp.isnan(g) | (rate <= 0), n_genes + 1.0, jnp.clip(g, 1.0, n_genes + 1.0))
    pos = jnp.cumsum(g.astype(jnp.int32)) - 1  # strictly increasing positions of the mutated genes
    inside = pos < n_genes
    z = jax.random.normal(k_val, (cap,), jnp.float32) * sigma
    delta = jnp.zeros((n_genes,), jnp.float32).at[pos].set(jnp.where(inside, z, 0.0), mode="drop",
                                                           indices_are_sorted=True, unique_indices=True)
    return delta, jnp.any(inside) & (sigma != 0), pos[-1] >= n_genes


def pick_individuals(key, n: int, individual_rate, n_gene_keys: int = 1):
    """Which of n individuals a mutation picks, and their gene keys, drawn as the whole-population operators draw
    them (so a mutation split over modules picks the same individuals in every module).

    Returns (picked (n,) bool, gene_keys (n, n_gene_keys) keys): individual i splits split(key, n)[i] into
    1 + n_gene_keys keys; the first decides the pick (Bernoulli(individual_rate)), the others drive its genes."""
    def one(k):
        ks = jax.random.split(k, 1 + n_gene_keys)
        return jax.random.bernoulli(ks[0], individual_rate), ks[1:]

    return jax.vmap(one)(jax.random.split(key, n))


def _mutate_rows(gene_keys, picked, leaves, *, gene_rate, sigma):
    """Mutate the picked rows of `leaves` (each (n, ...)) in place: ((leaves', mutated (n,) bool)).

    Individual i draws its genes over the concatenation of its rows in every leaf from gene_keys[i]: sparsely
    (`_sparse_genes`) when the rows hold at least SPARSE_MIN_GENES genes, else one uniform per gene
    (`_gaussian_genes`). Rows of individuals not picked are never drawn for, so a generation costs one pass over the
    rows plus the draws of the picked individuals only, not a (n, G) change. Untouched genes keep their exact bits
    (even -0.0)."""
    n = leaves[0].shape[0]
    sizes = [math.prod(x.shape[1:]) for x in leaves]
    total = sum(sizes)
    cap = _sparse_cap(total)

    def dense(key):
        return _gaussian_genes(key, total, gene_rate=gene_rate, sigma=sigma)

    def mutate(key, rows):
        if cap:
            delta, changed, complete = _sparse_genes(key, total, cap, gene_rate=gene_rate, sigma=sigma)
            delta, changed = jax.lax.cond(complete, lambda k: (delta, changed), dense, key)
        else:
            delta, changed = dense(key)
        out, start = [], 0
        for row, size in zip(rows, sizes):
            d = delta[start:start + size].reshape(row.shape).astype(row.dtype)
            out.append(jnp.where(d != 0, row + d, row))
            start += size
        return out, changed

    order = jnp.argsort(~picked, stable=True)  # the picked individuals first, in index order

    def body(j, carry):
        xs, mutated = carry
        i = order[j]
        # one row per leaf in, one out: the loop updates the buffers in place
        rows, changed = mutate(gene_keys[i], [x[i] for x in xs])
        xs = [jax.lax.dynamic_update_index_in_dim(x, r, i, 0) for x, r in zip(xs, rows)]
        return xs, mutated.at[i].set(changed)

    # a loop over the picked individuals only (a dynamic trip count): the others' rows are not touched
    return jax.lax.fori_loop(0, jnp.sum(picked).astype(jnp.int32), body, (list(leaves), jnp.zeros((n,), bool)))


def gaussian_mutation_picked(gene_keys, picked, factors, *, gene_rate, sigma):
    """`gaussian_mutation` with the individuals' picks and gene keys given (from `pick_individuals`): for one part
    of the population's tree (e.g. one module) with its own gene keys. gene_keys: (n,) keys; picked: (n,) bool;
    sigma: a resolved scalar. Returns (factors', mutated (n,) bool)."""
    leaves, treedef = jax.tree_util.tree_flatten(factors)
    out, mutated = _mutate_rows(gene_keys, jnp.asarray(picked, bool), leaves, gene_rate=gene_rate, sigma=sigma)
    return jax.tree_util.tree_unflatten(treedef, out), mutated


def gaussian_mutation(key, factors, *, individual_rate, gene_rate, sigma: ScalarOrSchedule, step=0):
    """Gaussian noise under a per-individual and per-gene Bernoulli mask.

    factors: pytree with leaves (P, ...); individual_rate, gene_rate: probabilities in [0, 1];
    sigma: noise std (float or optax schedule of `step`). Returns (factors', mutated: (P,) bool).
    """
    n = jax.tree_util.tree_leaves(factors)[0].shape[0]
    picked, gene_keys = pick_individuals(key, n, individual_rate)
    # one draw over an individual's concatenated genes, not one per leaf: drawing per leaf compiles one RNG
    # kernel per leaf (~420 for a SmolLM2 adapter, minutes of XLA compile on CPU)
    return gaussian_mutation_picked(gene_keys[:, 0], picked, factors, gene_rate=gene_rate,
                                    sigma=resolve_schedule(sigma, step))


def _svd_module_one(e, A, B, *, sigma):
    """One module of one individual. e: (m, m) masked N(0, 1) noise, m = min(r, d_in, d_out);
    A: (r, d_in), B: (d_out, r). Returns (A', B', changed)."""
    r = A.shape[0]
    dt = A.dtype
    qb, rb = jnp.linalg.qr(B.astype(jnp.float32))  # (d_out, k1), (k1, r)
    qa, ra = jnp.linalg.qr(A.T.astype(jnp.float32))  # (d_in, k2), (k2, r)
    u, s, vt = jnp.linalg.svd(rb @ ra.T, full_matrices=False)  # ΔW = (qb u) diag(s) (qa vt^T)^T
    m = s.shape[0]
    left = qb @ u  # (d_out, m) left singular vectors of ΔW
    right = qa @ vt.T  # (d_in, m) right singular vectors
    rs = jnp.sqrt(s)
    b_new = (left * rs[None, :]) @ (jnp.eye(m, dtype=jnp.float32) + sigma * e)  # (d_out, m)
    a_new = rs[:, None] * right.T  # (m, d_in)
    if m < r:  # thin shapes (d < r): pad back to the common rank with zeros
        b_new = jnp.pad(b_new, ((0, 0), (0, r - m)))
        a_new = jnp.pad(a_new, ((0, r - m), (0, 0)))
    changed = jnp.any(e != 0) & (sigma != 0) & jnp.any(s > 0)
    return a_new.astype(dt), b_new.astype(dt), changed


def _core_size(mod) -> int:
    r, d_in = mod["A"].shape[-2:]
    return min(r, d_in, mod["B"].shape[-2])


def _svd_one(key, tree, *, individual_rate, gene_rate, sigma):
    k_ind, k_mask, k_noise = jax.random.split(key, 3)
    picked = jax.random.bernoulli(k_ind, individual_rate)
    return _svd_modules(k_mask, k_noise, picked, tree, gene_rate=gene_rate, sigma=sigma)


def _svd_modules(k_mask, k_noise, picked, tree, *, gene_rate, sigma):
    """The modules of one individual whose pick is drawn: (tree', changed ())."""
    names = sorted(tree)
    sizes = [_core_size(tree[name]) for name in names]
    total = sum(m * m for m in sizes)
    noise = jax.random.normal(k_noise, (total,), jnp.float32) * jax.random.bernoulli(k_mask, gene_rate, (total,))
    out, changed, start = {}, jnp.zeros((), bool), 0
    for name, m in zip(names, sizes):
        mod = tree[name]
        e = noise[start:start + m * m].reshape(m, m)
        start += m * m
        a_new, b_new, ch = _svd_module_one(e, mod["A"], mod["B"], sigma=sigma)
        take = picked & ch
        out[name] = dict(mod, A=jnp.where(take, a_new, mod["A"]), B=jnp.where(take, b_new, mod["B"]))
        changed = changed | take
    return out, changed


def svd_mutation_picked(gene_keys, picked, factors, *, gene_rate, sigma):
    """`svd_mutation` with the picks and gene keys given (`pick_individuals(..., n_gene_keys=2)`: mask and noise
    keys per individual), e.g. for one module at a time. gene_keys: (n, 2) keys; picked: (n,) bool; sigma: a
    resolved scalar. Returns (factors', mutated (n,) bool)."""
    fn = lambda ks, p, t: _svd_modules(ks[0], ks[1], p, t, gene_rate=gene_rate, sigma=sigma)
    return jax.vmap(fn)(gene_keys, picked, factors)


def svd_mutation(key, factors, *, individual_rate, gene_rate, sigma: ScalarOrSchedule, step=0):
    """Noise in each individual's own singular subspace of ΔW = B @ A (see module docstring).

    factors: {module: {"A": (P, r, d_in), "B": (P, d_out, r)}}; sigma is relative to the singular values.
    Returns (factors', mutated: (P,) bool).
    """
    n = jax.tree_util.tree_leaves(factors)[0].shape[0]
    s = resolve_schedule(sigma, step)
    keys = jax.random.split(key, n)
    fn = lambda k, t: _svd_one(k, t, individual_rate=individual_rate, gene_rate=gene_rate, sigma=s)
    return jax.vmap(fn)(keys, factors)
