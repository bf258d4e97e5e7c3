"""Merge methods for ONE child: each takes its K parents' stacked tensor x (K, ...) and weights (K,), keys first.

    ties(key, x: (K, ...), weights: (K,), *, density, majority_sign_method, normalize, cuts=None) -> (...)
    merge_tensor(key, x, weights, config: MergeConfig, cuts=None) -> (...)      # dispatch on config.method

The semantics each method reproduces (mergekit, PEFT, the papers) are listed in operators.merge, which applies
them to a whole generation (vmapped over children); operators.delta_space applies the elementwise ones to the
parents' dense updates dW = B A.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from genome_jax.errors import UserError
from genome_jax.operators import trim as trim_ops
from genome_jax.operators.registry import SLERP_DOT_THRESHOLD, SLERP_EPS, MergeConfig
from kernels import ties as kties

__all__ = ["blx_alpha", "breadcrumbs", "dare_linear", "dare_ties", "linear", "magnitude_prune", "merge_tensor",
           "slerp", "slerp_coefficients", "slerp_t", "task_arithmetic", "ties", "uniform"]


# ------------------------------------------------------------------------------------------ single-child methods
# x: (K, ...) the child's parents, weights: (K,). Keys come first; deterministic methods ignore theirs.

def _wsum(x, w):
    """sum_k w_k x_k, summed in parent order."""
    acc = w[0] * x[0]
    for k in range(1, x.shape[0]):
        acc = acc + w[k] * x[k]
    return acc


def _maybe_normalize(total, weights, normalize: str):
    if normalize != "weight":
        return total
    s = jnp.sum(weights)
    return total / jnp.where(jnp.abs(s) < 1e-8, 1.0, s)


def _own_cuts(x, method: str, density: float, gamma: float = 0.0, select: str = "auto"):
    """Cuts of the K parents in x (K, ...) when the caller did not precompute them."""
    return trim_ops.tensor_cuts(x, method, density, gamma, impl=select)


def linear(key, x, weights):
    """Weighted average sum w_k x_k / sum w_k (mergekit `linear`)."""
    del key
    w = weights.astype(x.dtype)
    return _maybe_normalize(_wsum(x, w), w, "weight")


def task_arithmetic(key, x, weights, *, scale: float = 1.0, normalize: str = "weight"):
    """scale * sum w_k x_k, divided by sum w_k under normalize="weight" (mergekit lambda = scale; PEFT
    `task_arithmetic` with normalize="count")."""
    del key
    w = weights.astype(x.dtype)
    return scale * _maybe_normalize(_wsum(x, w), w, normalize)


def ties(key, x, weights, *, density: float, majority_sign_method: str = "total", normalize: str = "weight",
         cuts=None, select: str = "auto"):
    """TIES-merging (Yadav et al. 2023): trim each parent to its top-`density` magnitudes, elect a sign per entry,
    average the agreeing entries (kernels.ties_combine). cuts: (K,) precomputed per-parent cuts, or None."""
    del key
    if cuts is None:
        cuts = _own_cuts(x, "ties", density, select=select)
    w = weights.astype(x.dtype)
    trimmed = [kties.trim(x[k], cuts[k]) for k in range(x.shape[0])]
    return kties.ties_combine(trimmed, [w[k] for k in range(x.shape[0])],
                              majority_sign_method=majority_sign_method, normalize=normalize)


def magnitude_prune(key, x, weights, *, density: float, normalize: str = "weight", cuts=None, select: str = "auto"):
    """sum w_k trim(x_k): each parent keeps its top-`density` magnitudes (PEFT `magnitude_prune`)."""
    del key
    if cuts is None:
        cuts = _own_cuts(x, "magnitude_prune", density, select=select)
    w = weights.astype(x.dtype)
    trimmed = jnp.stack([kties.trim(x[k], cuts[k]) for k in range(x.shape[0])])
    return _maybe_normalize(_wsum(trimmed, w), w, normalize)


def _dare_drop(key, x, density: float, rescale: bool):
    keep = jax.random.bernoulli(key, density, x.shape)
    dropped = jnp.where(keep, x, jnp.zeros((), x.dtype))
    return dropped / jnp.asarray(density, x.dtype) if rescale else dropped


def dare_linear(key, x, weights, *, density: float, rescale: bool = True, normalize: str = "weight"):
    """DARE (Yu et al. 2024): drop each entry with probability 1 - density, rescale by 1/density, weighted sum
    (PEFT `dare_linear`). The keep mask is jax.random.bernoulli(key, density, x.shape)."""
    w = weights.astype(x.dtype)
    return _maybe_normalize(_wsum(_dare_drop(key, x, density, rescale), w), w, normalize)


def dare_ties(key, x, weights, *, density: float, majority_sign_method: str = "total", normalize: str = "weight",
              rescale: bool = True):
    """DARE drop + rescale, then TIES sign election and disjoint merge (PEFT `dare_ties`)."""
    d = _dare_drop(key, x, density, rescale)
    w = weights.astype(x.dtype)
    return kties.ties_combine([d[k] for k in range(x.shape[0])], [w[k] for k in range(x.shape[0])],
                              majority_sign_method=majority_sign_method, normalize=normalize)


def breadcrumbs(key, x, weights, *, density: float, gamma: float = 0.01, normalize: str = "weight", cuts=None,
                select: str = "auto"):
    """Model Breadcrumbs (Davari & Belilovsky 2023): per parent drop the `gamma` largest magnitudes and keep the next
    `density` fraction, then sum w_k x_k. cuts: (K, 2) = (cut of the n_top-th, cut of the (n_top+n_keep)-th)."""
    del key
    if cuts is None:
        cuts = _own_cuts(x, "breadcrumbs", density, gamma, select=select)
    w = weights.astype(x.dtype)
    kept = []
    for k in range(x.shape[0]):
        a = jnp.abs(x[k])
        keep = (a >= cuts[k, 1]) & (a < cuts[k, 0])  # below the outliers, within the kept band
        kept.append(jnp.where(keep, x[k], jnp.zeros((), x.dtype)))
    return _maybe_normalize(_wsum(jnp.stack(kept), w), w, normalize)


def slerp_coefficients(t, dot_u):
    """(s0, s1) with slerp = s0 v0 + s1 v1, given the cosine dot_u of the angle (computed as mergekit does: on
    copies normalised only when their norm exceeds SLERP_EPS) — lerp (1 - t, t) when |cos| > SLERP_DOT_THRESHOLD."""
    theta0 = jnp.arccos(jnp.clip(dot_u, -1.0, 1.0))
    sin0 = jnp.sin(theta0)
    theta_t = theta0 * t
    parallel = jnp.abs(dot_u) > SLERP_DOT_THRESHOLD
    safe = jnp.where(parallel, 1.0, sin0)
    s0 = jnp.where(parallel, 1.0 - t, jnp.sin(theta0 - theta_t) / safe)
    s1 = jnp.where(parallel, t, jnp.sin(theta_t) / safe)
    return s0, s1


def slerp_t(weights, t: float | None):
    """slerp position: the configured t, else w_1 / (w_0 + w_1) (0.5 when the weights sum to 0)."""
    if t is not None:
        return jnp.asarray(t, jnp.float32)
    w = weights.astype(jnp.float32)
    s = w[0] + w[1]
    return jnp.where(s == 0, 0.5, w[1] / jnp.where(s == 0, 1.0, s))


def slerp(key, x, weights, *, t: float | None = None):
    """Spherical interpolation between 2 parents per tensor (mergekit `slerp`); t=None -> w_1 / (w_0 + w_1)."""
    del key
    if x.shape[0] != 2:
        raise ValueError(f"slerp merges exactly 2 parents, got {x.shape[0]}")
    v0, v1 = x[0].astype(jnp.float32), x[1].astype(jnp.float32)
    n0, n1 = jnp.linalg.norm(v0), jnp.linalg.norm(v1)
    u0 = jnp.where(n0 > SLERP_EPS, v0 / jnp.where(n0 > SLERP_EPS, n0, 1.0), v0)
    u1 = jnp.where(n1 > SLERP_EPS, v1 / jnp.where(n1 > SLERP_EPS, n1, 1.0), v1)
    s0, s1 = slerp_coefficients(slerp_t(weights, t), jnp.sum(u0 * u1))
    return (s0 * v0 + s1 * v1).astype(x.dtype)


def blx_alpha(key, x, weights, *, alpha: float = 0.5):
    """BLX-alpha: each gene uniform in [lo - alpha d, hi + alpha d], lo/hi = min/max over the parents, d = hi - lo
    (so children can leave the parents' interval; alpha = 0 is plain blend crossover)."""
    del weights
    lo, hi = jnp.min(x, axis=0), jnp.max(x, axis=0)
    d = hi - lo
    u = jax.random.uniform(key, lo.shape, jnp.float32).astype(x.dtype)
    return lo - alpha * d + u * ((1.0 + 2.0 * alpha) * d)


def uniform(key, x, weights):
    """Uniform crossover: each gene copied from parent k with probability w_k / sum w (negative weights count as 0;
    all-zero weights -> equal odds)."""
    w = jnp.maximum(weights.astype(jnp.float32), 0.0)
    w = jnp.where(jnp.sum(w) > 0, w, jnp.ones_like(w))
    pick = jax.random.categorical(key, jnp.log(w), shape=x.shape[1:])
    return jnp.take_along_axis(x, pick[None], axis=0)[0]


def merge_tensor(key, x, weights, config: MergeConfig, cuts=None):
    """One child's merge of one tensor stack x (K, ...) by `config` (cuts: its parents' precomputed cuts)."""
    m, c = config.method, config
    if m == "linear":
        return linear(key, x, weights)
    if m == "task_arithmetic":
        return task_arithmetic(key, x, weights, scale=c.scale, normalize=c.normalize)
    if m == "ties":
        return ties(key, x, weights, density=c.density, majority_sign_method=c.majority_sign_method,
                    normalize=c.normalize, cuts=cuts, select=c.select)
    if m == "dare_linear":
        return dare_linear(key, x, weights, density=c.density, rescale=c.rescale, normalize=c.normalize)
    if m == "dare_ties":
        return dare_ties(key, x, weights, density=c.density, majority_sign_method=c.majority_sign_method,
                         normalize=c.normalize, rescale=c.rescale)
    if m == "breadcrumbs":
        return breadcrumbs(key, x, weights, density=c.density, gamma=c.gamma, normalize=c.normalize, cuts=cuts,
                           select=c.select)
    if m == "magnitude_prune":
        return magnitude_prune(key, x, weights, density=c.density, normalize=c.normalize, cuts=cuts,
                               select=c.select)
    if m == "slerp":
        return slerp(key, x, weights, t=c.t)
    if m == "blx_alpha":
        return blx_alpha(key, x, weights, alpha=c.alpha)
    if m == "uniform":
        return uniform(key, x, weights)
    raise UserError(f"unknown merge method {m!r}")
