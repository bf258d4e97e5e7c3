"""GENOME+: GENOME with succession (a particle-swarm step) and a growing population.

The population lives in N = `max_population_size` slots (static shapes for jit); `size` of them are alive.
One generation:
- `ask` (one jitted call): every alive individual moves by one succession step (velocity with inertia, pull to its
  personal best and the global best, push from the global worst; `genome_jax.operators.succession`), and
  `n_offspring` new children are bred from the population (parent selection -> crossover -> mutation).
  children = [moved particles (N slots, dead slots flagged), offspring (n_offspring)].
- `tell` (one jitted call): personal bests are updated, offspring join as new particles (zero velocity, personal
  best = themselves), individuals whose evaluation failed (non-finite fitness) are dropped, and while more than N
  remain, survivor selection (elites first, then `survivor_selection`) trims the pool to N. So the population
  grows from `population_size` to `max_population_size` and stays there. Global best (ever) and global worst
  (ever) are tracked with their factors.
A generation in which every evaluation failed leaves the population as it was.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from genome_jax.errors import UserError
from genome_jax.operators import selection as selection_ops
from genome_jax.operators.succession import succession, update_personal_best
from genome_jax.strategies import common
from genome_jax.strategies.common import StrategyParams
from genome_jax.strategies.genome import done, generation_key  # noqa: F401  (same semantics)

__all__ = ["GenomePlusState", "init", "ask", "tell", "done", "generation_key", "num_children"]


@struct.dataclass
class GenomePlusState:
    population: common.Factors  # (N, ...); slots >= size are empty (zeros)
    fitness: jax.Array  # (N,) float32, NaN in empty slots
    size: jax.Array  # () int32: alive individuals (slots 0..size-1)
    velocity: common.Factors  # (N, ...)
    pbest: common.Factors  # (N, ...) personal best positions
    pbest_fitness: jax.Array  # (N,)
    best: common.Factors  # global best ever (no population axis)
    best_fitness: jax.Array  # ()
    worst: common.Factors  # global worst ever (finite fitness)
    worst_fitness: jax.Array  # ()
    child_source: jax.Array  # (N + C,) int32: >= 0: unchanged copy of population[child_source]
    child_alive: jax.Array  # (N + C,) bool: False for children standing in empty slots
    tell_key: jax.Array  # (2,) uint32: the key `tell` uses for survivor selection (set by ask)
    key: jax.Array  # (2,) uint32
    generation: jax.Array  # () int32
    stall: jax.Array  # () int32
    history: jax.Array  # (max_generations + 1, 3)


def num_children(params: StrategyParams) -> int:
    return params.capacity + params.offspring_per_generation


def init(key, population, fitness, params: StrategyParams) -> GenomePlusState:
    """population: pytree (n0, ...) with n0 <= max_population_size; fitness: (n0,)."""
    n0 = common.population_size_of(population)
    if n0 > params.capacity:
        raise UserError(f"genome_plus: the initial population has {n0} individuals, more than max_population_size {params.capacity}")
    fitness = jnp.asarray(fitness, jnp.float32)
    if fitness.shape != (n0,):
        raise UserError(f"genome_plus: fitness has shape {fitness.shape}, expected ({n0},)")
    return _init(common.raw_key(key), population, fitness, params)


@functools.partial(jax.jit, static_argnames=("params",))
def _init(key, population, fitness, params):
    n = params.capacity
    n0 = fitness.shape[0]
    pad = lambda a: jnp.concatenate([a, jnp.zeros((n - n0,) + a.shape[1:], a.dtype)], axis=0)
    pop = jax.tree_util.tree_map(pad, population)
    f = jnp.concatenate([fitness, jnp.full((n - n0,), jnp.nan, jnp.float32)])
    b = selection_ops.descending_order(f)[0]
    w = selection_ops.descending_order(-f)[0]  # worst finite (non-finite sort last either way)
    c = num_children(params)
    return GenomePlusState(
        population=pop,
        fitness=f,
        size=jnp.asarray(n0, jnp.int32),
        velocity=jax.tree_util.tree_map(jnp.zeros_like, pop),
        pbest=pop,
        pbest_fitness=f,
        best=common.tree_index(pop, b),
        best_fitness=f[b],
        worst=common.tree_index(pop, w),
        worst_fitness=f[w],
        child_source=jnp.full((c,), -1, jnp.int32),
        child_alive=jnp.zeros((c,), bool),
        tell_key=key,
        key=key,
        generation=jnp.zeros((), jnp.int32),
        stall=jnp.zeros((), jnp.int32),
        history=common.record_history(common.empty_history(params), 0, common.fitness_stats(f)),
    )


@functools.partial(jax.jit, static_argnames=("params",))
def ask(key, state: GenomePlusState, params: StrategyParams):
    """Returns (children (N + n_offspring, ...), state with velocity, child_source, child_alive, tell_key set)."""
    n = params.capacity
    k_off, k_succ, k_tell = jax.random.split(key, 3)
    alive = jnp.arange(n) < state.size
    bred, parents, changed = common.make_offspring(
        k_off, state.population, state.fitness, params.offspring_per_generation, params, state.generation
    )
    x, v = succession(
        k_succ,
        state.population,
        state.velocity,
        state.pbest,
        state.best,
        state.worst,
        step=state.generation,
        config=params.succession_config,
    )
    x = common.tree_where(alive, x, state.population)
    v = common.tree_where(alive, v, state.velocity)
    moved = alive & common.tree_differs(x, state.population)
    children = common.tree_concat(x, bred)
    source = jnp.concatenate(
        [jnp.where(alive & ~moved, jnp.arange(n), -1), jnp.where(changed, -1, parents[:, 0])]
    ).astype(jnp.int32)
    child_alive = jnp.concatenate([alive, jnp.ones((params.offspring_per_generation,), bool)])
    return children, state.replace(velocity=v, child_source=source, child_alive=child_alive, tell_key=k_tell)


@functools.partial(jax.jit, static_argnames=("params",))
def tell(state: GenomePlusState, children, fitness, params: StrategyParams) -> GenomePlusState:
    """children: (N + n_offspring, ...) from `ask`; fitness: (N + n_offspring,) (copies and empty slots ignored)."""
    n = params.capacity
    f = common.inherit_fitness(fitness, state.child_source, state.fitness)
    f = jnp.where(state.child_alive, f, jnp.nan)
    moved = common.tree_take(children, jnp.arange(n))
    bred = common.tree_take(children, jnp.arange(n, f.shape[0]))
    f_bred = f[n:]
    pbest, pbest_f = update_personal_best(state.pbest, state.pbest_fitness, moved, f[:n])

    pool_x = children
    pool_v = common.tree_concat(state.velocity, jax.tree_util.tree_map(jnp.zeros_like, bred))
    pool_pb = common.tree_concat(pbest, bred)
    pool_pbf = jnp.concatenate([pbest_f, f_bred])
    ok = jnp.isfinite(f)  # alive and scored
    n_ok = jnp.sum(ok)
    keep = selection_ops.survivors(
        state.tell_key,
        jnp.where(ok, f, jnp.nan),
        n,
        n_elite=params.n_elite(n),
        method=params.survivor_selection,
        tournament_size=params.tournament_size,
        rank_pressure=params.rank_pressure,
    )
    size = jnp.minimum(n_ok, n).astype(jnp.int32)
    alive = jnp.arange(n) < size
    zero = lambda t: common.tree_where(alive, t, jax.tree_util.tree_map(jnp.zeros_like, t))
    new_pop = zero(common.tree_take(pool_x, keep))
    new_f = jnp.where(alive, f[keep], jnp.nan)
    new_v = zero(common.tree_take(pool_v, keep))
    new_pb = zero(common.tree_take(pool_pb, keep))
    new_pbf = jnp.where(alive, pool_pbf[keep], jnp.nan)

    b = selection_ops.descending_order(f)[0]
    w = selection_ops.descending_order(-f)[0]
    better = common.improves(f[b], state.best_fitness)
    worse = jnp.isfinite(f[w]) & ((f[w] < state.worst_fitness) | ~jnp.isfinite(state.worst_fitness))
    any_ok = n_ok > 0
    gen = state.generation + 1
    pick = lambda new, old: common.tree_where(any_ok, new, old)
    return state.replace(
        population=pick(new_pop, state.population),
        fitness=jnp.where(any_ok, new_f, state.fitness),
        size=jnp.where(any_ok, size, state.size),
        velocity=pick(new_v, state.velocity),
        pbest=pick(new_pb, state.pbest),
        pbest_fitness=jnp.where(any_ok, new_pbf, state.pbest_fitness),
        best=common.tree_where(better, common.tree_index(children, b), state.best),
        best_fitness=jnp.where(better, f[b], state.best_fitness),
        worst=common.tree_where(worse, common.tree_index(children, w), state.worst),
        worst_fitness=jnp.where(worse, f[w], state.worst_fitness),
        generation=gen,
        stall=jnp.where(better, 0, state.stall + 1),
        history=common.record_history(
            state.history, gen, common.fitness_stats(jnp.where(any_ok, new_f, state.fitness))
        ),
    )
