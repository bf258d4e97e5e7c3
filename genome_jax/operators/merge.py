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

Spaces: space="factors" merges A and B separately (GENOME, PEFT's non-SVD modes; cheap). space="delta" merges the
updates dW_k = B_k A_k and returns the best rank-r factors (operators.delta_space).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from genome_jax.errors import UserError
from genome_jax.operators import trim as trim_ops
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

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp", "blx_alpha",
           "uniform", "magnitude_prune")
SPACES = ("factors", "delta")
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "breadcrumbs", "magnitude_prune")
_SLERP_DOT_THRESHOLD = 0.9995
_SLERP_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Static configuration of a merge (hashable: a static argument of the jitted crossover).

    method: one of METHODS. density: fraction kept by trimming / DARE. majority_sign_method: "total" | "frequency".
    normalize: "weight" | "none" (mergekit normalize true/false) | "count" (PEFT; shrinks a self-merge, see above). rescale: DARE divides kept
    entries by density. gamma: breadcrumbs' fraction of largest magnitudes dropped. t: slerp position (None: from
    the weights). alpha: BLX-alpha extension. scale: task_arithmetic's lambda. space: "factors" | "delta".
    Delta space, elementwise methods: svd "randomized" | "exact", oversample and power_iters of the randomized SVD,
    child_chunk children per block (memory). kernel: TIES implementation in factor space ("auto": Pallas on GPU,
    fused jnp elsewhere; "jnp", "pallas", "pallas_interpret"). select: threshold select ("auto" | "native" | "jnp").
    """

    method: str = "ties"
    density: float = 0.2
    majority_sign_method: str = "total"
    normalize: str = "weight"
    rescale: bool = True
    gamma: float = 0.01
    t: float | None = None
    alpha: float = 0.5
    scale: float = 1.0
    space: str = "factors"
    svd: str = "randomized"
    oversample: int = 8
    power_iters: int = 2
    child_chunk: int = 8
    kernel: str = "auto"
    select: str = "auto"

    def __post_init__(self):
        def bad(field, allowed):
            raise UserError(f"merge {field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")

        if self.method not in METHODS:
            bad("method", METHODS)
        if self.space not in SPACES:
            bad("space", SPACES)
        if self.majority_sign_method not in kties.SIGN_METHODS:
            bad("majority_sign_method", kties.SIGN_METHODS)
        if self.normalize not in kties.NORMALIZE:
            bad("normalize", kties.NORMALIZE)
        if self.svd not in ("randomized", "exact"):
            bad("svd", ("randomized", "exact"))
        if self.kernel not in ("auto", "jnp", "pallas", "pallas_interpret"):
            bad("kernel", ("auto", "jnp", "pallas", "pallas_interpret"))
        if self.select not in ("auto", "native", "jnp"):
            bad("select", ("auto", "native", "jnp"))
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise UserError(f"merge density must be in (0, 1], got {self.density!r}")
        if not (isinstance(self.gamma, (int, float)) and 0.0 <= self.gamma < 1.0):
            raise UserError(f"merge gamma must be in [0, 1), got {self.gamma!r}")
        if self.t is not None and not (isinstance(self.t, (int, float)) and 0.0 <= self.t <= 1.0):
            raise UserError(f"merge t (slerp) must be in [0, 1] or None, got {self.t!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0.0 and math.isfinite(self.alpha)):
            raise UserError(f"merge alpha (blx_alpha) must be >= 0, got {self.alpha!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise UserError(f"merge scale must be a finite number, got {self.scale!r}")
        for name in ("oversample", "power_iters", "child_chunk"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= (1 if name == "child_chunk" else 0)):
                raise UserError(f"merge {name} must be an integer >= {1 if name == 'child_chunk' else 0}, got {v!r}")

    @property
    def cut_method(self) -> str | None:
        """The trimming rule whose per-parent cuts this merge needs (None: no magnitude trimming)."""
        return self.method if self.method in trim_ops.CUT_METHODS else None


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


def slerp_coefficients(t, dot_u, n0, n1):
    """(s0, s1) with slerp = s0 v0 + s1 v1, given the cosine of the angle (computed as mergekit does: on copies
    normalised only when their norm exceeds 1e-8) — lerp (1 - t, t) when |cos| > 0.9995."""
    del n0, n1
    theta0 = jnp.arccos(jnp.clip(dot_u, -1.0, 1.0))
    sin0 = jnp.sin(theta0)
    theta_t = theta0 * t
    parallel = jnp.abs(dot_u) > _SLERP_DOT_THRESHOLD
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
    u0 = jnp.where(n0 > _SLERP_EPS, v0 / jnp.where(n0 > _SLERP_EPS, n0, 1.0), v0)
    u1 = jnp.where(n1 > _SLERP_EPS, v1 / jnp.where(n1 > _SLERP_EPS, n1, 1.0), v1)
    s0, s1 = slerp_coefficients(slerp_t(weights, t), jnp.sum(u0 * u1), n0, n1)
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


# -------------------------------------------------------------------------------------------------- generations
def parent_cuts(factors, config: MergeConfig, needed=None):
    """Per-parent trim cuts for every tensor (None when the method does not trim by magnitude). Compute once per
    generation and pass to `crossover(..., cuts=)` to reuse across calls; `crossover` computes them otherwise.
    needed: optional (P,) bool of this generation's parents (others may be skipped: cut +inf)."""
    if config.cut_method is None:
        return None
    if config.space == "delta":
        from genome_jax.operators import delta_space

        return delta_space.delta_cuts(factors, config)
    return trim_ops.parent_cuts(factors, config.cut_method, config.density, config.gamma, impl=config.select,
                                needed=needed)


def _check_parents(parent_idx, weights, config: MergeConfig):
    if parent_idx.ndim != 2 or weights.shape != parent_idx.shape:
        raise UserError(f"crossover: parent_idx {parent_idx.shape} and weights {weights.shape} must both be (C, K)")
    if config.method == "slerp" and parent_idx.shape[1] != 2:
        raise UserError(f"slerp merges exactly 2 parents per child, got K={parent_idx.shape[1]}")


def merge_one(key, parents, weights, *, config: MergeConfig = MergeConfig(), cuts=None):
    """One child from its K parents: parents is a pytree with leaves (K, ...), weights (K,). Leaf l uses the key
    fold_in(key, l). cuts: a tree like parents with the parents' cuts (computed here when None)."""
    if config.space == "delta":
        from genome_jax.operators import delta_space

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
        from genome_jax.operators import delta_space

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
