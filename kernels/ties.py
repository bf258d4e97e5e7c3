"""TIES merge of gathered parents in one pass: trim (per-parent magnitude cut) + sign election + disjoint merge.

    ties_merge(x: (P, n), cuts: (P,), parent_idx: (C, K) int, weights: (C, K)) -> (C, n)
    child c = TIES(x[parent_idx[c, 0]], ..., x[parent_idx[c, K-1]]; weights[c])

The cuts come from `kernels.threshold` (computed once per parent, reused by every child). Each output element reads
its K parents' entries once, so the whole generation is one pass over memory. Two implementations:
- `ties_merge_reference`: pure jnp (gathered rows feed one XLA fusion); the CPU path and the fallback.
- `ties_merge_pallas`: a Pallas kernel over a (child, column block) grid; runs compiled on GPU and with
  interpret=True on CPU (tests check it equals the reference bit for bit).
Both call `ties_combine`, the elementwise core, with sums taken in parent order, so they agree exactly.

Semantics (`normalize`, `majority_sign_method`), for trimmed parents t_k and weights w_k:
- "count" (PEFT `ties` / `disjoint_merge`): the sign is elected from the unweighted t_k ("total": sign of sum t_k,
  "frequency": sign of sum sign(t_k); ties -> +), and the child is sum_{k agrees} w_k t_k / max(#agree, 1).
- "weight" (mergekit `ties`, normalize=true): the sign is elected from w_k t_k, and the child is
  sum_{k agrees} w_k t_k / sum_{k agrees} w_k (a zero divisor becomes 1).
- "none" (mergekit normalize=false): the same election, and the child is sum_{k agrees} w_k t_k.
A zero entry never agrees (its sign is 0), so it never counts in a divisor.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["ties_combine", "ties_merge", "ties_merge_reference", "ties_merge_pallas", "SIGN_METHODS", "NORMALIZE"]

SIGN_METHODS = ("total", "frequency")
NORMALIZE = ("count", "weight", "none")


def _check(majority_sign_method: str, normalize: str) -> None:
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def ties_combine(trimmed: Sequence[jax.Array], weights: Sequence, *, majority_sign_method: str = "total",
                 normalize: str = "count") -> jax.Array:
    """Sign election + disjoint merge of K already-trimmed arrays of one shape; weights: K scalars (or arrays that
    broadcast against them). Elementwise; sums run in list order (so every caller gets identical bits)."""
    _check(majority_sign_method, normalize)
    weighted = [w * t for t, w in zip(trimmed, weights)]
    voters = trimmed if normalize == "count" else weighted
    score = None
    for v in voters:
        term = v if majority_sign_method == "total" else jnp.sign(v)
        score = term if score is None else score + term
    majority = jnp.where(score >= 0, 1.0, -1.0).astype(trimmed[0].dtype)
    num = den = None
    for v, wt, w in zip(voters, weighted, weights):
        agree = jnp.sign(v) == majority
        part = jnp.where(agree, wt, 0.0)
        if normalize == "count":
            d = agree.astype(wt.dtype)
        elif normalize == "weight":
            d = jnp.where(agree, jnp.asarray(w, wt.dtype), 0.0)
        else:
            d = None
        num = part if num is None else num + part
        if d is not None:
            den = d if den is None else den + d
    if normalize == "count":
        return num / jnp.maximum(den, 1.0)
    if normalize == "weight":
        return num / jnp.where(den == 0, 1.0, den)
    return num


def trim(x, cut):
    """Keep entries with |x| >= cut, zero the rest (cut broadcasts against x)."""
    return jnp.where(jnp.abs(x) >= cut, x, jnp.zeros((), x.dtype))


def ties_merge_reference(x, cuts, parent_idx, weights, *, majority_sign_method: str = "total",
                         normalize: str = "count") -> jax.Array:
    """Pure-jnp TIES over gathered rows. x (P, n), cuts (P,), parent_idx (C, K), weights (C, K) -> (C, n)."""
    K = parent_idx.shape[1]
    trimmed, ws = [], []
    for k in range(K):
        i = parent_idx[:, k]
        trimmed.append(trim(x[i], cuts[i][:, None]))
        ws.append(weights[:, k][:, None].astype(x.dtype))
    return ties_combine(trimmed, ws, majority_sign_method=majority_sign_method, normalize=normalize)


def _block_for(n: int, block: int | None) -> int:
    if block is not None:
        return block
    b = 1
    while b < n and b < 2048:
        b *= 2
    return b


@functools.partial(jax.jit, static_argnames=("majority_sign_method", "normalize", "block", "interpret"))
def ties_merge_pallas(x, cuts, parent_idx, weights, *, majority_sign_method: str = "total", normalize: str = "count",
                      block: int | None = None, interpret: bool = False) -> jax.Array:
    """Pallas TIES: grid (C, ceil(n / block)); program (c, j) reads its K parents' column block j once, trims each
    by its parent's cut, elects the sign and writes the merged block. Same arguments and result as
    `ties_merge_reference`. `interpret=True` runs it on CPU (tests); on GPU it compiles (Triton)."""
    from jax.experimental import pallas as pl  # optional backend: loads the Pallas/Triton lowering only when used

    _check(majority_sign_method, normalize)
    P, n = x.shape
    C, K = parent_idx.shape
    bl = _block_for(n, block)
    n_pad = -(-n // bl) * bl
    xp = jnp.pad(x, ((0, 0), (0, n_pad - n))) if n_pad != n else x  # padded zeros never survive a trim
    idx = parent_idx.astype(jnp.int32)
    w = weights.astype(x.dtype)
    cuts = cuts.astype(jnp.float32)

    def kernel(idx_ref, w_ref, cut_ref, x_ref, o_ref):
        c = pl.program_id(0)
        cols = pl.ds(pl.program_id(1) * bl, bl)
        trimmed, ws = [], []
        for k in range(K):
            i = idx_ref[c, k]
            trimmed.append(trim(x_ref[i, cols], cut_ref[i]))
            ws.append(w_ref[c, k])
        o_ref[0, :] = ties_combine(trimmed, ws, majority_sign_method=majority_sign_method, normalize=normalize)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((C, n_pad), x.dtype),
        grid=(C, n_pad // bl),
        in_specs=[
            pl.BlockSpec((C, K), lambda c, j: (0, 0)),
            pl.BlockSpec((C, K), lambda c, j: (0, 0)),
            pl.BlockSpec((P,), lambda c, j: (0,)),
            pl.BlockSpec((P, n_pad), lambda c, j: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, bl), lambda c, j: (c, j)),
        interpret=interpret,
    )(idx, w, cuts, xp)
    return out[:, :n] if n_pad != n else out


def ties_merge(x, cuts, parent_idx, weights, *, majority_sign_method: str = "total", normalize: str = "count",
               impl: str = "auto") -> jax.Array:
    """TIES for a generation: impl "auto" (Pallas on GPU, jnp elsewhere), "pallas", "pallas_interpret", "jnp"."""
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "jnp"
    if impl == "jnp":
        return ties_merge_reference(x, cuts, parent_idx, weights, majority_sign_method=majority_sign_method,
                                    normalize=normalize)
    if impl in ("pallas", "pallas_interpret"):
        return ties_merge_pallas(x, cuts, parent_idx, weights, majority_sign_method=majority_sign_method,
                                 normalize=normalize, interpret=impl == "pallas_interpret")
    raise ValueError(f"impl must be auto, pallas, pallas_interpret or jnp, got {impl!r}")
