"""Merging in delta space: merge the true updates dW_k = B_k A_k (scale folded into B) and return rank-r factors.

Linear-type merges (linear, task_arithmetic, slerp) never materialise dW. The child's update is a linear combination
sum_k c_k B_k A_k = [c_1 B_1 .. c_K B_K] [A_1; ..; A_K] = Bcat Acat, so with Bcat = Qb Rb and Acat^T = Qa Ra
(thin QR), dW = Qb (Rb Ra^T) Qa^T and the SVD of the small (K r x K r) core gives the exact best rank-r
factors (Eckart-Young): B' = Qb U_r S_r^(1/2), A' = S_r^(1/2) V_r^T Qa^T. Cost per child and module:
O((d_out + d_in) (K r)^2) flops, O((d_out + d_in) K r) memory. slerp's coefficients need <dW_0, dW_1> and the norms,
which also come from r x r Gram products: <B_0 A_0, B_1 A_1> = sum((B_0^T B_1) * (A_0 A_1^T)).

Elementwise merges (ties, dare_*, breadcrumbs, magnitude_prune, blx_alpha, uniform) need dW entry by entry. They
run blockwise: one module at a time, `child_chunk` children at a time (lax.map over chunks, vmap inside). A child
forms its K parents' dW (K d_out d_in floats), merges them with the same single-child method as factor space (the
per-parent trim cuts over each parent's whole dW are computed once per generation, a chunk of parents at a time),
and returns the best rank-r factors of the merged matrix by a truncated SVD:
- svd="randomized" (default; Halko, Martinsson & Tropp 2011): l = r + oversample Gaussian probes, `power_iters`
  power iterations with re-orthonormalisation, then an exact SVD of the small (l x d_in) projection.
  Flops per child and module ~ 2 K d_out d_in r (forming dW) + 4 (power_iters + 1) d_out d_in l.
- svd="exact": jnp.linalg.svd of the merged matrix, O(d_out d_in min(d_out, d_in)); for tests and small shapes.
Peak memory ~ child_chunk (K + 1) d_out d_in x 4 bytes (SmolLM2 gate_proj, K = 2, chunk 8: ~85 MB). The merged
matrix of an elementwise method is generally full rank, so its rank-r truncation is an approximation: the best one
for svd="exact", within the randomized SVD's error otherwise (tests bound it).

Keys: module m (sorted path order) of child c uses fold_in(split(key, C)[c], m), split into (merge, svd) keys.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from genome_jax.errors import UserError
from genome_jax.operators import trim as trim_ops
from genome_jax.operators.methods import merge_tensor, slerp_coefficients, slerp_t
from genome_jax.operators.registry import LOWRANK_METHODS, SLERP_EPS

__all__ = ["LOWRANK_METHODS", "crossover_delta", "delta_cuts", "lowrank_combine", "merge_one_delta",
           "truncated_svd_factors"]


def _modules(factors) -> list[str]:
    if not isinstance(factors, dict) or not factors:
        raise UserError("space='delta' needs the population's {module_path: {'A', 'B'}} factors dict")
    for path, leaf in factors.items():
        if not isinstance(leaf, dict) or set(leaf) != {"A", "B"}:
            raise UserError(f"space='delta': module {path} must hold exactly 'A' and 'B'")
    return sorted(factors)


def _pad_rank(A, B, rank):
    """Zero-pad (take, d_in) / (d_out, take) factors up to `rank` components."""
    take = A.shape[0]
    if take == rank:
        return A, B
    return jnp.pad(A, ((0, rank - take), (0, 0))), jnp.pad(B, ((0, 0), (0, rank - take)))


def lowrank_combine(A, B, coeffs, rank: int):
    """Best rank-`rank` factors of sum_k coeffs_k B_k A_k without forming it.

    A (K, r, d_in), B (K, d_out, r), coeffs (K,) -> (A' (rank, d_in), B' (d_out, rank)), balanced (equal singular
    values on both sides)."""
    K, r, d_in = A.shape
    Bcat = jnp.concatenate([coeffs[k] * B[k] for k in range(K)], axis=1)       # (d_out, K r)
    Acat = A.reshape(K * r, d_in)                                               # (K r, d_in)
    Qb, Rb = jnp.linalg.qr(Bcat)                                                # (d_out, mb), (mb, K r)
    Qa, Ra = jnp.linalg.qr(Acat.T)                                              # (d_in, ma), (ma, K r)
    U, S, Vt = jnp.linalg.svd(Rb @ Ra.T, full_matrices=False)                   # core (mb, ma)
    take = min(rank, S.shape[0])
    sq = jnp.sqrt(S[:take])
    Bn = (Qb @ U[:, :take]) * sq[None, :]
    An = sq[:, None] * (Vt[:take] @ Qa.T)
    return _pad_rank(An, Bn, rank)


def truncated_svd_factors(key, M, rank: int, *, method: str = "randomized", oversample: int = 8,
                          power_iters: int = 2):
    """Rank-`rank` factors (A' (rank, d_in), B' (d_out, rank)) of M (d_out, d_in), B' A' ~ M (exact SVD: optimal)."""
    d_out, d_in = M.shape
    if method == "exact":
        U, S, Vt = jnp.linalg.svd(M, full_matrices=False)
    else:
        l = min(rank + oversample, d_out, d_in)
        Q, _ = jnp.linalg.qr(M @ jax.random.normal(key, (d_in, l), M.dtype))
        for _ in range(power_iters):
            Z, _ = jnp.linalg.qr(M.T @ Q)
            Q, _ = jnp.linalg.qr(M @ Z)
        Ub, S, Vt = jnp.linalg.svd(Q.T @ M, full_matrices=False)
        U = Q @ Ub
    take = min(rank, S.shape[0])
    sq = jnp.sqrt(S[:take])
    return _pad_rank(sq[:, None] * Vt[:take], U[:, :take] * sq[None, :], rank)


def _dense(A, B):
    """dW of a stack: A (K, r, d_in), B (K, d_out, r) -> (K, d_out, d_in)."""
    return jnp.einsum("kor,kri->koi", B, A)


def _gram_inner(A0, B0, A1, B1):
    """<B0 A0, B1 A1>_F from r x r products."""
    return jnp.sum((B0.T @ B1) * (A0 @ A1.T))


def _lowrank_coeffs(A, B, weights, config):
    w = weights.astype(jnp.float32)
    if config.method == "linear":
        s = jnp.sum(w)
        return w / jnp.where(jnp.abs(s) < 1e-8, 1.0, s)
    if config.method == "task_arithmetic":
        c = config.scale * w
        if config.normalize == "weight":
            s = jnp.sum(w)
            c = c / jnp.where(jnp.abs(s) < 1e-8, 1.0, s)
        return c
    # slerp on dW: mergekit's rule (normalise copies whose norm exceeds eps), from Gram products
    n0 = jnp.sqrt(jnp.maximum(_gram_inner(A[0], B[0], A[0], B[0]), 0.0))
    n1 = jnp.sqrt(jnp.maximum(_gram_inner(A[1], B[1], A[1], B[1]), 0.0))
    d0 = jnp.where(n0 > SLERP_EPS, n0, 1.0)
    d1 = jnp.where(n1 > SLERP_EPS, n1, 1.0)
    dot_u = _gram_inner(A[0], B[0], A[1], B[1]) / (d0 * d1)
    s0, s1 = slerp_coefficients(slerp_t(weights, config.t), dot_u)
    return jnp.stack([s0, s1])


def _module_child(key, A, B, weights, config, cuts):
    """One child, one module: A (K, r, d_in), B (K, d_out, r) -> (A' (r, d_in), B' (d_out, r))."""
    rank = A.shape[1]
    if config.method in LOWRANK_METHODS:
        return lowrank_combine(A, B, _lowrank_coeffs(A, B, weights, config).astype(A.dtype), rank)
    k_merge, k_svd = jax.random.split(key)
    merged = merge_tensor(k_merge, _dense(A, B), weights, config, cuts)
    return truncated_svd_factors(k_svd, merged, rank, method=config.svd, oversample=config.oversample,
                                 power_iters=config.power_iters)


def _chunked(fn, xs, chunk: int):
    """lax.map of fn over chunks of `chunk` rows (fn takes and returns pytrees of (chunk, ...) arrays)."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if n <= chunk:
        return fn(xs)
    nc = -(-n // chunk)
    fill = jnp.minimum(jnp.arange(nc * chunk), n - 1)  # pad by repeating the last row (works for key arrays too)

    def split(a):
        a = a[fill] if nc * chunk != n else a
        return a.reshape((nc, chunk) + a.shape[1:])

    ys = jax.lax.map(fn, jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda a: a.reshape((nc * chunk,) + a.shape[2:])[:n], ys)


def delta_cuts(factors, config):
    """Per-parent cuts over each parent's whole dW: {path: (P,) or (P, 2)}; `child_chunk` parents at a time."""
    out = {}
    for path in _modules(factors):
        A, B = factors[path]["A"], factors[path]["B"]
        fn = lambda ab: trim_ops.tensor_cuts(_dense(*ab), config.cut_method, config.density, config.gamma,
                                             impl=config.select)
        out[path] = _chunked(fn, (A, B), config.child_chunk)
    return out


def merge_one_delta(key, parents, weights, *, config, cuts=None):
    """One child in delta space: parents {path: {"A": (K, r, d_in), "B": (K, d_out, r)}}, weights (K,)."""
    out = {}
    for mi, path in enumerate(_modules(parents)):
        A, B = parents[path]["A"], parents[path]["B"]
        c = None
        if config.cut_method is not None:
            c = cuts[path] if cuts is not None else trim_ops.tensor_cuts(
                _dense(A, B), config.cut_method, config.density, config.gamma, impl=config.select)
        An, Bn = _module_child(jax.random.fold_in(key, mi), A, B, weights, config, c)
        out[path] = {"A": An, "B": Bn}
    return out


def crossover_delta(key, factors, parent_idx, weights, *, config, cuts=None):
    """C children in delta space (see module doc); same arguments and result layout as merge.crossover.
    One jitted program per distinct module shape (module index traced), called once per module."""
    paths = _modules(factors)
    child_keys = jax.random.split(key, parent_idx.shape[0])
    out = {}
    for mi, path in enumerate(paths):
        A, B = factors[path]["A"], factors[path]["B"]
        c = cuts[path] if cuts is not None else None
        An, Bn = _crossover_module(child_keys, jnp.int32(mi), A, B, parent_idx, weights, c, config=config)
        out[path] = {"A": An, "B": Bn}
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _crossover_module(child_keys, mi, A, B, parent_idx, weights, cut, *, config):
    """Module `mi` (A (P, r, d_in), B (P, d_out, r)) of every child: (A' (C, r, d_in), B' (C, d_out, r))."""
    C, K = parent_idx.shape
    use_cuts = config.cut_method is not None
    if use_cuts and cut is None:
        cut = _chunked(lambda ab: trim_ops.tensor_cuts(_dense(*ab), config.cut_method, config.density, config.gamma,
                                                       impl=config.select), (A, B), config.child_chunk)
    Ag = jnp.stack([A[parent_idx[:, k]] for k in range(K)], axis=1)             # (C, K, r, d_in)
    Bg = jnp.stack([B[parent_idx[:, k]] for k in range(K)], axis=1)             # (C, K, d_out, r)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(child_keys, mi)
    gc = cut[parent_idx] if use_cuts else jnp.zeros((C, K), jnp.float32)

    def one(kc, a, b, w, c):
        return _module_child(kc, a, b, w, config, c if use_cuts else None)

    if config.method in LOWRANK_METHODS:
        return jax.vmap(one)(keys, Ag, Bg, weights, gc)
    return _chunked(lambda xs: jax.vmap(one)(*xs), (keys, Ag, Bg, weights, gc), config.child_chunk)
