"""GENOME: a generational genetic algorithm over LoRA adapters with elitism.

One generation (`ask`: a small jitted plan, then one jitted program per module): the `n_elite` best individuals are
copied unchanged, and the other P - n_elite children are bred by parent selection -> crossover (a merge of
`n_parents` parents with probability `cross_rate`) -> mutation. The caller scores the children that `needs_score`
marks; `tell` makes the children the new population (elites keep their fitness; nothing is re-scored that did not
change), tracks the best individual ever seen, the fitness history and the early-stopping counter.

    state = init(key, population, fitness, params)
    while not done(state, params):
        children, state = ask(generation_key(state), state, params)
        fitness = score(children, needs_score(state))     # NaN where not scored
        state = tell(state, children, fitness, params)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from genome_jax.errors import UserError
from genome_jax.operators import selection as selection_ops
from genome_jax.strategies import common
from genome_jax.strategies.common import StrategyParams

__all__ = ["GenomeState", "init", "ask", "tell", "done", "generation_key", "num_children"]


@struct.dataclass
class GenomeState:
    population: common.Factors  # (P, ...)
    fitness: jax.Array  # (P,) float32
    best: common.Factors  # best individual ever seen (no population axis)
    best_fitness: jax.Array  # () float32
    child_source: jax.Array  # (P,) int32: >= 0 when child i is an unchanged copy of population[child_source[i]]
    key: jax.Array  # (2,) uint32: the run's key; generation keys are fold_in(key, generation)
    generation: jax.Array  # () int32: completed generations
    stall: jax.Array  # () int32: generations since the best improved
    history: jax.Array  # (max_generations + 1, 3) float32: best / mean / worst per generation (row 0 = initial)


def num_children(params: StrategyParams) -> int:
    return params.population_size


def init(key, population, fitness, params: StrategyParams) -> GenomeState:
    """population: pytree (P, ...) with P == params.population_size; fitness: (P,) its scores."""
    n = common.population_size_of(population)
    if n != params.population_size:
        raise UserError(f"genome: the initial population has {n} individuals but population_size is {params.population_size}")
    fitness = jnp.asarray(fitness, jnp.float32)
    if fitness.shape != (n,):
        raise UserError(f"genome: fitness has shape {fitness.shape}, expected ({n},)")
    return _init(common.raw_key(key), population, fitness, params)


@functools.partial(jax.jit, static_argnames=("params",))
def _init(key, population, fitness, params):
    b = selection_ops.descending_order(fitness)[0]
    return GenomeState(
        population=population,
        fitness=fitness,
        best=common.tree_index(population, b),
        best_fitness=fitness[b],
        child_source=jnp.full((params.population_size,), -1, jnp.int32),
        key=key,
        generation=jnp.zeros((), jnp.int32),
        stall=jnp.zeros((), jnp.int32),
        history=common.record_history(common.empty_history(params), 0, common.fitness_stats(fitness)),
    )


def generation_key(state) -> jax.Array:
    """The key for the next `ask`: a pure function of the state, so a resumed run draws the same numbers."""
    return jax.random.fold_in(state.key, state.generation)


def ask(key, state: GenomeState, params: StrategyParams):
    """Returns (children (P, ...), state with child_source set).

    A small jitted plan (elites, parents, weights, picks), then one jitted program per module (common.breed)."""
    plan = _ask_plan(key, state.fitness, state.generation, params)
    children, changed = common.breed(plan, state.population, params)
    return children, state.replace(child_source=_child_source(plan, changed))


@functools.partial(jax.jit, static_argnames=("params",))
def _ask_plan(key, fitness, generation, params):
    p = params.population_size
    n_elite = params.n_elite(p)
    plan = common.offspring_plan(key, fitness, p - n_elite, params, generation)
    if n_elite:
        plan["elites"] = selection_ops.elites(fitness, n_elite)
    return plan


@jax.jit
def _child_source(plan, changed):
    bred = jnp.where(changed, -1, plan["parents"][:, 0])
    return (jnp.concatenate([plan["elites"], bred]) if "elites" in plan else bred).astype(jnp.int32)


def tell(state: GenomeState, children, fitness, params: StrategyParams) -> GenomeState:
    """children: (P, ...) from `ask`; fitness: (P,) (entries of unchanged copies are ignored).
    A small jitted plan, then the best individual copied module by module."""
    s = _tell_plan(state.child_source, state.fitness, state.best_fitness, state.stall, state.history,
                   state.generation, fitness)
    pick = lambda ch, old: common.pick_row(s["better"], s["b"], ch, old)
    best = common.per_module(pick, common.module_names(children), children, state.best)
    return state.replace(population=children, fitness=s["f"], best=best, best_fitness=s["best_fitness"],
                         generation=s["generation"], stall=s["stall"], history=s["history"])


@jax.jit
def _tell_plan(child_source, parent_fitness, best_fitness, stall, history, generation, fitness):
    f = common.inherit_fitness(fitness, child_source, parent_fitness)
    b = selection_ops.descending_order(f)[0]
    better = common.improves(f[b], best_fitness)
    gen = generation + 1
    return {"f": f, "b": b, "better": better, "best_fitness": jnp.where(better, f[b], best_fitness),
            "generation": gen, "stall": jnp.where(better, 0, stall + 1),
            "history": common.record_history(history, gen, common.fitness_stats(f))}


def done(state, params: StrategyParams) -> bool:
    """Early stopping: `patience` generations in a row without a better best (never when patience == 0)."""
    return params.patience > 0 and int(state.stall) >= params.patience
