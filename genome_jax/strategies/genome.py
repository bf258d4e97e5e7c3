"""GENOME: a generational genetic algorithm over LoRA adapters with elitism.

One generation (`ask`: a small jitted plan, then one jitted program per module): the `n_elite` best individuals are
copied unchanged, and the other P - n_elite children are bred by parent selection -> crossover (a merge of
`n_parents` parents with probability `cross_rate`) -> mutation. The caller scores the children that `needs_score`
marks; `tell` makes the children the new population (elites keep their fitness; nothing is re-scored that did not
change) and tracks the best individual ever seen and the generations since it last improved.

    strategy = Genome(population_size=8)                    # or make_strategy("genome", ...)
    params = strategy.default_params
    state = strategy.init(key, population, fitness, params)
    children, state = strategy.ask(key_ask, state, params)
    fitness = score(children, strategy.needs_score(state))  # NaN where not scored
    state, metrics = strategy.tell(key_tell, state, children, fitness, params)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from genome_jax.errors import UserError
from genome_jax.operators import selection as selection_ops
from genome_jax.strategies import common

__all__ = ["Genome", "GenomeState"]


@struct.dataclass
class GenomeState:
    population: common.Factors  # (P, ...)
    fitness: jax.Array  # (P,) float32
    best: common.Factors  # best individual ever seen (no population axis)
    best_fitness: jax.Array  # () float32
    child_source: jax.Array  # (P,) int32: >= 0 when child i is an unchanged copy of population[child_source[i]]
    generation: jax.Array  # () int32: completed generations
    stall: jax.Array  # () int32: generations since the best improved

    POPULATION_FIELDS = ("population",)  # fields whose leaves carry the population axis (genome_jax.sharding)


@dataclasses.dataclass(frozen=True)
class Genome(common.Strategy):
    """GENOME: exactly `population_size` individuals; `n_elite` of them are copied each generation."""

    name = "genome"
    Params = common.Params

    @property
    def num_children(self) -> int:
        return self.population_size

    @property
    def population_sizes(self) -> frozenset[int]:
        return frozenset({self.population_size})

    def check_initial_size(self, n: int) -> None:
        if n != self.population_size:
            raise UserError(f"genome: the initial population has {n} individuals but population_size is "
                            f"{self.population_size}")

    @functools.partial(jax.jit, static_argnums=0)
    def _init(self, population, fitness):
        b = selection_ops.descending_order(fitness)[0]
        return GenomeState(
            population=population,
            fitness=fitness,
            best=common.tree_index(population, b),
            best_fitness=fitness[b],
            child_source=jnp.full((self.population_size,), -1, jnp.int32),
            generation=jnp.zeros((), jnp.int32),
            stall=jnp.zeros((), jnp.int32),
        )

    def ask(self, key, state: GenomeState, params):
        """Returns (children (P, ...), state with child_source set).

        A small jitted plan (elites, parents, weights, picks), then one jitted program per module (common.breed)."""
        plan = self._ask_plan(key, state.fitness, state.generation, common.as_float32(params))
        children, changed = common.breed(plan, state.population, self)
        return children, state.replace(child_source=_child_source(plan, changed))

    @functools.partial(jax.jit, static_argnums=0)
    def _ask_plan(self, key, fitness, generation, params):
        p, n_elite = self.population_size, self.n_elite
        plan = common.offspring_plan(key, fitness, p - n_elite, self, params, generation)
        if n_elite:
            plan["elites"] = selection_ops.elites(fitness, n_elite)
        return plan

    def tell(self, key, state: GenomeState, children, fitness, params):
        """children: (P, ...) from `ask`; fitness: (P,) (entries of unchanged copies are ignored). key: unused
        (GENOME's tell draws nothing). Returns (state, metrics). A small jitted plan, then the best individual
        copied module by module."""
        s = _tell_plan(state.child_source, state.fitness, state.best_fitness, state.stall, state.generation,
                       jnp.asarray(fitness, jnp.float32))
        pick = lambda ch, old: common.pick_row(s["better"], s["b"], ch, old)  # noqa: E731
        best = common.per_module(pick, common.module_names(children), children, state.best)
        state = state.replace(population=children, fitness=s["f"], best=best, best_fitness=s["best_fitness"],
                              generation=s["generation"], stall=s["stall"])
        return state, {**self.metrics(state), "children": jnp.int32(self.population_size)}


@jax.jit
def _child_source(plan, changed):
    bred = jnp.where(changed, -1, plan["parents"][:, 0])
    return (jnp.concatenate([plan["elites"], bred]) if "elites" in plan else bred).astype(jnp.int32)


@jax.jit
def _tell_plan(child_source, parent_fitness, best_fitness, stall, generation, fitness):
    f = common.inherit_fitness(fitness, child_source, parent_fitness)
    b = selection_ops.descending_order(f)[0]
    better = common.improves(f[b], best_fitness)
    return {"f": f, "b": b, "better": better, "best_fitness": jnp.where(better, f[b], best_fitness),
            "generation": generation + 1, "stall": jnp.where(better, 0, stall + 1)}
