"""Selection over a fitness vector: which individuals become parents, elites, or survivors.

Fitness is maximised. An individual whose fitness is not finite (NaN: a failed evaluation; +-inf) is never
selected while any individual with finite fitness exists; if none has, draws are uniform over everyone (there is
nothing better to pick; callers should treat an all-NaN generation as an error of the evaluator).
Every function is keyed, vectorised (no Python loop over individuals) and jit-friendly; `n` and the method
parameters are static. All return int32 indices into the population.

Parent selection (with replacement, `n` independent draws):
- `roulette`: fitness-proportional. With all finite fitness >= 0, p_i = f_i / sum f (the classic rule); when some
  fitness is negative, the weights are shifted to f_i - min f (so the worst gets 0). All-zero weights: uniform.
- `tournament`: each draw holds a tournament of `size` distinct contestants (without replacement, drawn among the
  finite-fitness individuals) and the fittest wins; ties go to a random contestant.
- `truncation`: uniform among the top ceil(`percent` * M) finite individuals.
- `rank`: Baker's linear ranking, p = (2 - s)/M + 2 rank (s - 1) / (M (M - 1)) with rank 0 = worst, selective
  pressure s in [1, 2]; tied fitness share the average rank.
(M: the number of individuals with finite fitness.)

`elites` returns the top n (finite first, ties by index). `survivors` returns n distinct individuals: the elites,
then the rest drawn without replacement by a method (truncation = the next best; roulette and rank = successive
sampling proportional to their weights via the Gumbel top-k trick; tournament = repeated tournaments among those
not yet chosen).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from genome_jax.sizes import n_elites  # noqa: F401  (re-exported: the strategies' elite count)

PARENT_METHODS = ("roulette", "tournament", "truncation", "rank")
SURVIVOR_METHODS = PARENT_METHODS

__all__ = [
    "PARENT_METHODS",
    "SURVIVOR_METHODS",
    "roulette",
    "roulette_weights",
    "tournament",
    "truncation",
    "rank",
    "rank_weights",
    "elites",
    "select_parents",
    "survivors",
    "descending_order",
    "n_elites",
]


def _valid(fitness):
    return jnp.isfinite(fitness)


def descending_order(fitness) -> jax.Array:
    """Indices sorting fitness (P,) from best to worst; non-finite last; ties by index (stable)."""
    f = jnp.asarray(fitness, jnp.float32)
    return jnp.argsort(jnp.where(_valid(f), -f, jnp.inf), stable=True).astype(jnp.int32)


def roulette_weights(fitness) -> jax.Array:
    """Unnormalised roulette weights (P,) >= 0 as in the module docstring (0 for non-finite fitness)."""
    f = jnp.asarray(fitness, jnp.float32)
    valid = _valid(f)
    fmin = jnp.min(jnp.where(valid, f, jnp.inf))
    shift = jnp.where(fmin < 0, fmin, 0.0)
    w = jnp.where(valid, f - shift, 0.0)
    total = jnp.sum(w)
    w = jnp.where(total > 0, w, valid.astype(jnp.float32))  # all equal (or all zero): uniform over valid
    return jnp.where(jnp.any(valid), w, jnp.ones_like(w))


def _categorical(key, w, n):
    logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    return jax.random.categorical(key, logits, shape=(n,)).astype(jnp.int32)


def roulette(key, fitness, n: int) -> jax.Array:
    """n fitness-proportional draws with replacement. fitness: (P,). Returns (n,) int32."""
    return _categorical(key, roulette_weights(fitness), n)


def rank_weights(fitness, pressure: float = 1.5) -> jax.Array:
    """Linear-ranking probabilities (P,) summing to 1 (0 for non-finite fitness). pressure s in [1, 2]."""
    f = jnp.asarray(fitness, jnp.float32)
    valid = _valid(f)
    m = jnp.sum(valid).astype(jnp.float32)
    vj = valid[None, :]
    less = jnp.sum(vj & (f[None, :] < f[:, None]), axis=1)
    equal = jnp.sum(vj & (f[None, :] == f[:, None]), axis=1) - 1  # others with the same fitness
    r = less + 0.5 * equal  # average rank among the valid, 0 = worst
    denom = jnp.maximum(m * (m - 1.0), 1.0)
    p = (2.0 - pressure) / jnp.maximum(m, 1.0) + 2.0 * r * (pressure - 1.0) / denom
    p = jnp.where(m > 1, p, 1.0)  # a single valid individual takes everything
    p = jnp.where(valid, p, 0.0)
    return jnp.where(jnp.any(valid), p, jnp.full_like(p, 1.0 / f.shape[0]))


def rank(key, fitness, n: int, *, pressure: float = 1.5) -> jax.Array:
    """n linear-ranking draws with replacement. Returns (n,) int32."""
    return _categorical(key, rank_weights(fitness, pressure), n)


def tournament(key, fitness, n: int, *, size: int) -> jax.Array:
    """n tournaments of `size` distinct contestants each; the fittest contestant wins. Returns (n,) int32."""
    f = jnp.asarray(fitness, jnp.float32)
    p = f.shape[0]
    k = min(int(size), p)
    valid = _valid(f)
    u = jax.random.uniform(key, (n, p))
    # A random order per tournament with finite-fitness individuals first; its first k are the contestants.
    u = jnp.where(valid[None, :], u, 2.0 + u)
    contestants = jnp.argsort(u, axis=1)[:, :k]
    cf = jnp.where(valid[contestants], f[contestants], -jnp.inf)
    win = jnp.argmax(cf, axis=1)  # first maximum in a random order: random tie-breaking
    return jnp.take_along_axis(contestants, win[:, None], axis=1)[:, 0].astype(jnp.int32)


def truncation(key, fitness, n: int, *, percent: float) -> jax.Array:
    """n uniform draws among the top ceil(percent * M) individuals (at least 1). Returns (n,) int32."""
    f = jnp.asarray(fitness, jnp.float32)
    valid = _valid(f)
    m = jnp.sum(valid)
    m = jnp.where(m > 0, m, f.shape[0])
    top = jnp.maximum(jnp.ceil(percent * m - 1e-6), 1).astype(jnp.int32)
    pos = jnp.floor(jax.random.uniform(key, (n,)) * top).astype(jnp.int32)
    return descending_order(f)[jnp.minimum(pos, top - 1)]


def elites(fitness, n: int) -> jax.Array:
    """The n best individuals, best first (finite first, ties by lower index). Returns (n,) int32."""
    return descending_order(fitness)[:n]


def select_parents(key, fitness, n: int, *, method: str, tournament_size: int = 3,
                   truncation_percent: float = 0.5, rank_pressure: float = 1.5) -> jax.Array:
    """Dispatch to one parent-selection method by name. Returns (n,) int32."""
    if method == "roulette":
        return roulette(key, fitness, n)
    if method == "tournament":
        return tournament(key, fitness, n, size=tournament_size)
    if method == "truncation":
        return truncation(key, fitness, n, percent=truncation_percent)
    if method == "rank":
        return rank(key, fitness, n, pressure=rank_pressure)
    raise ValueError(f"unknown selection method {method!r}; known: {', '.join(PARENT_METHODS)}")


def survivors(key, fitness, n: int, *, n_elite: int = 0, method: str = "truncation", tournament_size: int = 3,
              rank_pressure: float = 1.5) -> jax.Array:
    """n distinct individuals: the n_elite best, then n - n_elite more without replacement by `method`.

    Individuals with non-finite fitness come after every finite one (they fill only when nothing else is left).
    fitness: (P,) with P >= n. Returns (n,) int32, elites first.
    """
    f = jnp.asarray(fitness, jnp.float32)
    p = f.shape[0]
    if n > p:
        raise ValueError(f"cannot keep {n} survivors out of {p}")
    order = descending_order(f)
    valid = _valid(f)
    if method == "truncation" or n_elite >= n:
        return order[:n]
    elite_mask = jnp.zeros((p,), bool).at[order[:n_elite]].set(True)
    if method in ("roulette", "rank"):
        w = roulette_weights(f) if method == "roulette" else rank_weights(f, rank_pressure)
        g = jax.random.gumbel(key, (p,))
        score = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) + g, g)
        # tiers: elites, positive weight, zero weight but finite, non-finite; within a tier by score.
        tier = jnp.where(elite_mask, 0, jnp.where(w > 0, 1, jnp.where(valid, 2, 3)))
        rest = jnp.lexsort((-score, tier))
        return jnp.concatenate([order[:n_elite], rest[n_elite:n]]).astype(jnp.int32)
    if method == "tournament":
        k = min(int(tournament_size), p)

        def body(i, carry):
            chosen, taken = carry
            u = jax.random.uniform(jax.random.fold_in(key, i), (p,))
            tier = jnp.where(taken, 0, jnp.where(valid, 2, 1))  # prefer available, then finite
            contestants = jnp.argsort((2 - tier) + u)[:k]  # k distinct, in random order within a tier
            ct = tier[contestants]
            top = ct == jnp.max(ct)
            score = jnp.where(top, jnp.where(valid[contestants], f[contestants], 0.0), -jnp.inf)
            win = contestants[jnp.argmax(score)]
            return chosen.at[i].set(win), taken.at[win].set(True)

        chosen0 = jnp.zeros((n,), jnp.int32).at[:n_elite].set(order[:n_elite])
        chosen, _ = jax.lax.fori_loop(n_elite, n, body, (chosen0, elite_mask))
        return chosen
    raise ValueError(f"unknown survivor selection method {method!r}; known: {', '.join(SURVIVOR_METHODS)}")
