"""GENOME+: GENOME with succession (a particle-swarm step) and a growing population.

The population lives in N = `capacity` slots (static shapes for jit); `size` of them are alive.
One generation:
- `ask` (a small jitted plan, then one jitted program per module): every alive individual moves by one succession
  step (velocity with inertia, pull to its personal best and the global best, push from the global worst;
  `genome_jax.operators.succession`), and `n_offspring` new children are bred from the population (parent
  selection -> crossover -> mutation). children = [moved particles (N slots, dead slots flagged), offspring].
- `tell` (likewise): personal bests are updated, offspring join as new particles (zero velocity, personal
  best = themselves), individuals whose evaluation failed (non-finite fitness) are dropped, and while more than N
  remain, survivor selection (elites first, then `survivor_selection`, drawn with tell's key) trims the pool to N.
  So the population grows from `population_size` to `max_population_size` and stays there. Global best (ever) and
  global worst (ever) are tracked with their factors.
A generation in which every evaluation failed leaves the population as it was.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from genome_jax.errors import UserError
from genome_jax.operators import selection as selection_ops
from genome_jax.operators.succession import SuccessionConfig, succession_coefficients, succession_move
from genome_jax.strategies import common

__all__ = ["GenomePlus", "GenomePlusParams", "GenomePlusState"]


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
    generation: jax.Array  # () int32
    stall: jax.Array  # () int32

    POPULATION_FIELDS = ("population", "velocity", "pbest")  # leaves with the population axis (genome_jax.sharding)


@struct.dataclass
class GenomePlusParams(common.Params):
    """GENOME's numbers plus the swarm's (see common.SETTINGS)."""

    inertia: jax.Array
    cognitive: jax.Array
    social: jax.Array
    repel: jax.Array
    step_size: jax.Array
    step_size_decay: jax.Array


@dataclasses.dataclass(frozen=True)
class GenomePlus(common.Strategy):
    """GENOME+: starts from `population_size`, adds `n_offspring` (None: population_size) children per generation,
    keeps at most `max_population_size` (None: 2 x population_size) by survivor selection."""

    max_population_size: int | None = common.SETTINGS["max_population_size"]
    n_offspring: int | None = common.SETTINGS["n_offspring"]
    survivor_selection: str = common.SETTINGS["survivor_selection"]

    name = "genome_plus"
    Params = GenomePlusParams

    @property
    def capacity(self) -> int:
        """Slots in the population arrays (max population)."""
        return self.max_population_size if self.max_population_size is not None else 2 * self.population_size

    @property
    def offspring_per_generation(self) -> int:
        return self.n_offspring if self.n_offspring is not None else self.population_size

    @property
    def n_survivor_elites(self) -> int:
        return selection_ops.n_elites(self.capacity, self.elite_percent)

    @property
    def num_children(self) -> int:
        return self.capacity + self.offspring_per_generation

    @property
    def population_sizes(self) -> frozenset[int]:
        return frozenset({self.population_size, self.capacity, self.num_children})

    def needs_score(self, state) -> jax.Array:
        """As Strategy.needs_score; children standing in empty slots are never scored."""
        return (state.child_source < 0) & state.child_alive

    def check_initial_size(self, n: int) -> None:
        if n > self.capacity:
            raise UserError(f"genome_plus: the initial population has {n} individuals, more than "
                            f"max_population_size {self.capacity}")

    @functools.partial(jax.jit, static_argnums=0)
    def _init(self, population, fitness):
        n = self.capacity
        n0 = fitness.shape[0]
        pad = lambda a: jnp.concatenate([a, jnp.zeros((n - n0,) + a.shape[1:], a.dtype)], axis=0)  # noqa: E731
        pop = jax.tree_util.tree_map(pad, population)
        f = jnp.concatenate([fitness, jnp.full((n - n0,), jnp.nan, jnp.float32)])
        b = selection_ops.descending_order(f)[0]
        w = selection_ops.descending_order(-f)[0]  # worst finite (non-finite sort last either way)
        c = self.num_children
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
            generation=jnp.zeros((), jnp.int32),
            stall=jnp.zeros((), jnp.int32),
        )

    def ask(self, key, state: GenomePlusState, params):
        """Returns (children (N + n_offspring, ...), state with velocity, child_source, child_alive set).

        A small jitted plan (parents, picks, the swarm's coefficients), then one jitted program per module."""
        plan = self._ask_plan(key, state.fitness, state.size, state.generation, common.as_float32(params))
        names = common.module_names(state.population)
        children, velocity = [], []
        changed, moved = plan["crossed"], jnp.zeros((self.capacity,), bool)
        for mi, name in enumerate(names):
            mods = [common.module_of(t, name) for t in (state.population, state.velocity, state.pbest, state.best,
                                                         state.worst)]
            ch, v, changed, moved = self._ask_module(plan, jnp.int32(mi), *mods, changed, moved)
            children.append(ch)
            velocity.append(v)
        source, child_alive = _sources(plan, changed, moved)
        return common.from_modules(names, children), state.replace(
            velocity=common.from_modules(names, velocity), child_source=source, child_alive=child_alive)

    @functools.partial(jax.jit, static_argnums=0)
    def _ask_plan(self, key, fitness, size, generation, params):
        k_off, k_succ = jax.random.split(key)
        plan = common.offspring_plan(k_off, fitness, self.offspring_per_generation, self, params, generation)
        plan["r"] = succession_coefficients(k_succ, self.capacity)
        plan["lam"] = common.decayed(params.step_size, params.step_size_decay, generation)
        plan["swarm"] = {k: getattr(params, k) for k in ("inertia", "cognitive", "social", "repel")}
        plan["alive"] = jnp.arange(self.capacity) < size
        return plan

    @functools.partial(jax.jit, static_argnums=0)
    def _ask_module(self, plan, mi, pop, vel, pbest, best, worst, changed, moved):
        """Module `mi`: the particles' step and the offspring. Returns (children, velocity, changed, moved)."""
        alive = plan["alive"]
        x, v = succession_move(plan["r"], plan["lam"], pop, vel, pbest, best, worst, config=SuccessionConfig(**plan["swarm"]))
        x = common.tree_where(alive, x, pop)
        v = common.tree_where(alive, v, vel)
        moved = moved | (alive & common.tree_differs(x, pop))
        rows, mutated = common.breed_module(plan, mi, pop, self, front=x)  # the moved particles, then the offspring
        return rows, v, changed | mutated, moved

    def tell(self, key, state: GenomePlusState, children, fitness, params):
        """children: (N + n_offspring, ...) from `ask`; fitness: (N + n_offspring,) (copies and empty slots
        ignored); key: survivor selection's draws. Returns (state, metrics). A small jitted plan (personal bests,
        survivors, global best and worst), then one jitted program per module."""
        s = self._tell_plan(key, state.child_source, state.child_alive, state.fitness, state.pbest_fitness,
                            state.size, state.best_fitness, state.worst_fitness, state.stall, state.generation,
                            jnp.asarray(fitness, jnp.float32), common.as_float32(params))
        names = common.module_names(children)
        pop, vel, pb, best, worst = common.per_module(
            lambda *mods: _tell_module(s, *mods), names, children, state.velocity, state.pbest, state.population,
            state.best, state.worst)
        state = state.replace(
            population=pop, fitness=s["fitness"], size=s["size"], velocity=vel, pbest=pb,
            pbest_fitness=s["pbest_fitness"], best=best, best_fitness=s["best_fitness"], worst=worst,
            worst_fitness=s["worst_fitness"], generation=s["generation"], stall=s["stall"])
        return state, {**self.metrics(state), "children": jnp.sum(state.child_alive).astype(jnp.int32)}

    @functools.partial(jax.jit, static_argnums=0)
    def _tell_plan(self, key, child_source, child_alive, parent_fitness, pbest_fitness, size, best_fitness,
                   worst_fitness, stall, generation, fitness, params):
        n = self.capacity
        f = common.inherit_fitness(fitness, child_source, parent_fitness)
        f = jnp.where(child_alive, f, jnp.nan)
        f_moved = f[:n]
        pb_better = jnp.isfinite(f_moved) & ((f_moved > pbest_fitness) | ~jnp.isfinite(pbest_fitness))
        pbest_f = jnp.where(pb_better, f_moved, pbest_fitness)  # as update_personal_best
        pool_pbf = jnp.concatenate([pbest_f, f[n:]])
        ok = jnp.isfinite(f)  # alive and scored
        n_ok = jnp.sum(ok)
        keep = selection_ops.survivors(
            key,
            jnp.where(ok, f, jnp.nan),
            n,
            n_elite=self.n_survivor_elites,
            method=self.survivor_selection,
            tournament_size=self.tournament_size,
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
        return {
            "pb_better": pb_better, "keep": keep, "alive": alive, "any_ok": any_ok, "b": b, "w": w, "better": better,
            "worse": worse,
            "fitness": jnp.where(any_ok, new_f, parent_fitness),
            "size": jnp.where(any_ok, new_size, size),
            "pbest_fitness": jnp.where(any_ok, new_pbf, pbest_fitness),
            "best_fitness": jnp.where(better, f[b], best_fitness),
            "worst_fitness": jnp.where(worse, f[w], worst_fitness),
            "generation": generation + 1,
            "stall": jnp.where(better, 0, stall + 1),
        }


@jax.jit
def _sources(plan, changed, moved):
    alive = plan["alive"]
    n = alive.shape[0]
    source = jnp.concatenate(
        [jnp.where(alive & ~moved, jnp.arange(n), -1), jnp.where(changed, -1, plan["parents"][:, 0])]
    ).astype(jnp.int32)
    return source, jnp.concatenate([alive, jnp.ones(changed.shape, bool)])


@jax.jit
def _tell_module(s, children, velocity, pbest, population, best, worst):
    """One module of the new state: (population, velocity, pbest, best, worst)."""
    n = s["alive"].shape[0]
    moved = common.tree_take(children, jnp.arange(n))
    bred = common.tree_take(children, jnp.arange(n, common.population_size_of(children)))
    pb = common.tree_where(s["pb_better"], moved, pbest)
    pool_v = common.tree_concat(velocity, jax.tree_util.tree_map(jnp.zeros_like, bred))
    pool_pb = common.tree_concat(pb, bred)
    zero = lambda t: common.tree_where(s["alive"], t, jax.tree_util.tree_map(jnp.zeros_like, t))  # noqa: E731
    pick = lambda new, old: common.tree_where(s["any_ok"], new, old)  # noqa: E731
    return (
        pick(zero(common.tree_take(children, s["keep"])), population),
        pick(zero(common.tree_take(pool_v, s["keep"])), velocity),
        pick(zero(common.tree_take(pool_pb, s["keep"])), pbest),
        common.tree_where(s["better"], common.tree_index(children, s["b"]), best),
        common.tree_where(s["worse"], common.tree_index(children, s["w"]), worst),
    )
