"""GENOME+: GENOME with succession (a particle-swarm step) and a growing population.

The population lives in N = `max_population_size` slots (static shapes for jit); `size` of them are alive.
One generation:
- `ask` (a small jitted plan, then one jitted program per module): every alive individual moves by one succession
  step (velocity with inertia, pull to its personal best and the global best, push from the global worst;
  `genome_jax.operators.succession`), and `n_offspring` new children are bred from the population (parent selection -> crossover -> mutation).
  children = [moved particles (N slots, dead slots flagged), offspring (n_offspring)].
- `tell` (likewise): personal bests are updated, offspring join as new particles (zero velocity, personal
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
from genome_jax.operators.mutation import resolve_schedule
from genome_jax.operators.succession import succession_coefficients, succession_move
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


def ask(key, state: GenomePlusState, params: StrategyParams):
    """Returns (children (N + n_offspring, ...), state with velocity, child_source, child_alive, tell_key set).

    A small jitted plan (parents, picks, the swarm's coefficients), then one jitted program per module."""
    plan = _ask_plan(key, state.fitness, state.size, state.generation, params)
    names = common.module_names(state.population)
    children, velocity = [], []
    changed, moved = plan["crossed"], jnp.zeros((params.capacity,), bool)
    for mi, name in enumerate(names):
        mods = [common.module_of(t, name) for t in (state.population, state.velocity, state.pbest, state.best,
                                                     state.worst)]
        ch, v, changed, moved = _ask_module(plan, jnp.int32(mi), *mods, changed, moved, params=params)
        children.append(ch)
        velocity.append(v)
    source, child_alive = _sources(plan, changed, moved)
    return common.from_modules(names, children), state.replace(
        velocity=common.from_modules(names, velocity), child_source=source, child_alive=child_alive,
        tell_key=plan["k_tell"])


@functools.partial(jax.jit, static_argnames=("params",))
def _ask_plan(key, fitness, size, generation, params):
    n = params.capacity
    k_off, k_succ, k_tell = jax.random.split(key, 3)
    plan = common.offspring_plan(k_off, fitness, params.offspring_per_generation, params, generation)
    plan["r"] = succession_coefficients(k_succ, n)
    plan["lam"] = resolve_schedule(params.succession_config.step_size, generation)
    plan["alive"] = jnp.arange(n) < size
    plan["k_tell"] = k_tell
    return plan


@functools.partial(jax.jit, static_argnames=("params",))
def _ask_module(plan, mi, pop, vel, pbest, best, worst, changed, moved, params):
    """Module `mi`: the particles' step and the offspring. Returns (children, velocity, changed, moved)."""
    bred, mutated = common.breed_module(plan, mi, pop, params)
    alive = plan["alive"]
    x, v = succession_move(plan["r"], plan["lam"], pop, vel, pbest, best, worst, config=params.succession_config)
    x = common.tree_where(alive, x, pop)
    v = common.tree_where(alive, v, vel)
    moved = moved | (alive & common.tree_differs(x, pop))
    return common.tree_concat(x, bred), v, changed | mutated, moved


@jax.jit
def _sources(plan, changed, moved):
    alive = plan["alive"]
    n = alive.shape[0]
    source = jnp.concatenate(
        [jnp.where(alive & ~moved, jnp.arange(n), -1), jnp.where(changed, -1, plan["parents"][:, 0])]
    ).astype(jnp.int32)
    return source, jnp.concatenate([alive, jnp.ones(changed.shape, bool)])


def tell(state: GenomePlusState, children, fitness, params: StrategyParams) -> GenomePlusState:
    """children: (N + n_offspring, ...) from `ask`; fitness: (N + n_offspring,) (copies and empty slots ignored).
    A small jitted plan (personal bests, survivors, global best and worst), then one jitted program per module."""
    s = _tell_plan(state.tell_key, state.child_source, state.child_alive, state.fitness, state.pbest_fitness,
                   state.size, state.best_fitness, state.worst_fitness, state.stall, state.history,
                   state.generation, fitness, params=params)
    names = common.module_names(children)
    pop, vel, pb, best, worst = common.per_module(
        lambda *mods: _tell_module(s, *mods), names, children, state.velocity, state.pbest, state.population,
        state.best, state.worst)
    return state.replace(
        population=pop, fitness=s["fitness"], size=s["size"], velocity=vel, pbest=pb,
        pbest_fitness=s["pbest_fitness"], best=best, best_fitness=s["best_fitness"], worst=worst,
        worst_fitness=s["worst_fitness"], generation=s["generation"], stall=s["stall"], history=s["history"])


@functools.partial(jax.jit, static_argnames=("params",))
def _tell_plan(tell_key, child_source, child_alive, parent_fitness, pbest_fitness, size, best_fitness,
               worst_fitness, stall, history, generation, fitness, params):
    n = params.capacity
    f = common.inherit_fitness(fitness, child_source, parent_fitness)
    f = jnp.where(child_alive, f, jnp.nan)
    f_moved = f[:n]
    pb_better = jnp.isfinite(f_moved) & ((f_moved > pbest_fitness) | ~jnp.isfinite(pbest_fitness))
    pbest_f = jnp.where(pb_better, f_moved, pbest_fitness)  # as update_personal_best
    pool_pbf = jnp.concatenate([pbest_f, f[n:]])
    ok = jnp.isfinite(f)  # alive and scored
    n_ok = jnp.sum(ok)
    keep = selection_ops.survivors(
        tell_key,
        jnp.where(ok, f, jnp.nan),
        n,
        n_elite=params.n_elite(n),
        method=params.survivor_selection,
        tournament_size=params.tournament_size,
        rank_pressure=params.rank_pressure,
    )
    new_size = jnp.minimum(n_ok, n).astype(jnp.int32)
    alive = jnp.arange(n) < new_size
    new_f = jnp.where(alive, f[keep], jnp.nan)
    new_pbf = jnp.where(alive, pool_pbf[keep], jnp.nan)
    b = selection_ops.descending_order(f)[0]
    w = selection_ops.descending_order(-f)[0]
    better = common.improves(f[b], best_fitness)
    worse = jnp.isfinite(f[w]) & ((f[w] < worst_fitness) | ~jnp.isfinite(worst_fitness))
    any_ok = n_ok > 0
    gen = generation + 1
    return {
        "pb_better": pb_better, "keep": keep, "alive": alive, "any_ok": any_ok, "b": b, "w": w, "better": better,
        "worse": worse,
        "fitness": jnp.where(any_ok, new_f, parent_fitness),
        "size": jnp.where(any_ok, new_size, size),
        "pbest_fitness": jnp.where(any_ok, new_pbf, pbest_fitness),
        "best_fitness": jnp.where(better, f[b], best_fitness),
        "worst_fitness": jnp.where(worse, f[w], worst_fitness),
        "generation": gen,
        "stall": jnp.where(better, 0, stall + 1),
        "history": common.record_history(history, gen, common.fitness_stats(jnp.where(any_ok, new_f, parent_fitness))),
    }


@jax.jit
def _tell_module(s, children, velocity, pbest, population, best, worst):
    """One module of the new state: (population, velocity, pbest, best, worst)."""
    n = s["alive"].shape[0]
    moved = common.tree_take(children, jnp.arange(n))
    bred = common.tree_take(children, jnp.arange(n, common.population_size_of(children)))
    pb = common.tree_where(s["pb_better"], moved, pbest)
    pool_v = common.tree_concat(velocity, jax.tree_util.tree_map(jnp.zeros_like, bred))
    pool_pb = common.tree_concat(pb, bred)
    zero = lambda t: common.tree_where(s["alive"], t, jax.tree_util.tree_map(jnp.zeros_like, t))
    pick = lambda new, old: common.tree_where(s["any_ok"], new, old)
    return (
        pick(zero(common.tree_take(children, s["keep"])), population),
        pick(zero(common.tree_take(pool_v, s["keep"])), velocity),
        pick(zero(common.tree_take(pool_pb, s["keep"])), pbest),
        common.tree_where(s["better"], common.tree_index(children, s["b"]), best),
        common.tree_where(s["worse"], common.tree_index(children, s["w"]), worst),
    )
