"""Pieces shared by the GENOME and GENOME+ strategies: settings, the `Strategy` base class, `Params`, pytree
helpers, offspring, initialisation.

A population here is the `factors` pytree of `Population` (leaves with the individual on axis 0):
`{module_path: {"A": (P, r, d_in), "B": (P, d_out, r)}}`. Crossover is `genome_jax.operators.merge.crossover`.

A strategy is split the evosax way:
- the *strategy object* (a frozen, hashable dataclass: a static jit argument) fixes shapes and structure: sizes,
  elite count, merge methods, mutation kind, selection kinds, tournament size;
- its `Params` (a pytree of float32 scalars: a traced jit argument) holds the hyperparameters that are plain
  numbers, so a new value is a new argument, never a new program.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from genome_jax.errors import UserError
from genome_jax.operators import merge
from genome_jax.operators import mutation as mutation_ops
from genome_jax.operators import selection as selection_ops

Factors = Any  # the population pytree

MUTATIONS = ("gaussian", "svd")
CROSS_WEIGHTS = ("random", "equal", "fitness")

# Every strategy setting and its default (the keywords of `make_strategy`). Which of them a method uses: its class's
# fields (structure) and its Params' fields (plain numbers); the rest are ignored by that method.
SETTINGS: dict[str, Any] = {
    "population_size": 10,  # genome: the population; genome_plus: the initial population
    "max_population_size": None,  # genome_plus: slots of the population (None: 2 x population_size)
    "n_offspring": None,  # genome_plus: children bred per generation (None: population_size)
    "combine": "ties",  # merge method (or MergeConfig) of the initial population
    "cross": "ties",  # merge method (or MergeConfig) of crossover
    "n_parents": 2,
    "cross_rate": 0.8,
    "cross_weights": "random",  # random (U(0,1), normalised) | equal | fitness (roulette weights of the parents)
    "mutation": "gaussian",  # gaussian | svd
    "individual_mutation_rate": 0.15,
    "gene_mutation_rate": 0.01,
    "sigma": 0.01,
    "sigma_decay": 1.0,  # sigma at generation t: sigma * sigma_decay ** t
    "elite_percent": 0.02,  # elites: selection.n_elites(population, elite_percent) (at least one when > 0)
    "selection": "roulette",  # parent selection: roulette | tournament | truncation | rank
    "tournament_size": 3,
    "truncation_percent": 0.5,
    "rank_pressure": 1.5,
    "survivor_selection": "truncation",  # genome_plus trimming: truncation | roulette | rank | tournament
    "inertia": 0.4,
    "cognitive": 0.3,
    "social": 0.5,
    "repel": 0.1,
    "step_size": 1.0,
    "step_size_decay": 0.95,  # step size at generation t: step_size * step_size_decay ** t
}


# ---- validation (one rule set for make_strategy and the constructors) ----

def _bad(name: str, what: str, v) -> UserError:
    return UserError(f"strategy setting '{name}' must be {what}, got {v!r}")


def _rate(name, v, lo=0.0, hi=1.0, lo_open=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        raise _bad(name, f"in {'(' if lo_open else '['}{lo}, {hi}]", v)


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(name, f"an integer >= {lo}", v)


def _one_of(name, v, allowed):
    if v not in allowed:
        raise _bad(name, f"one of {', '.join(allowed)}", v)


def validate_settings(s: dict[str, Any]) -> None:
    """Raise UserError naming the first bad setting. s: every key of SETTINGS."""
    _int("population_size", s["population_size"], 2)
    if s["max_population_size"] is not None:
        _int("max_population_size", s["max_population_size"], 2)
        if s["max_population_size"] < s["population_size"]:
            raise UserError(f"strategy setting 'max_population_size' ({s['max_population_size']}) must be >= "
                            f"'population_size' ({s['population_size']})")
    if s["n_offspring"] is not None:
        _int("n_offspring", s["n_offspring"], 1)
    _int("n_parents", s["n_parents"], 1)
    for name in ("cross_rate", "individual_mutation_rate", "gene_mutation_rate", "elite_percent"):
        _rate(name, s[name])
    if selection_ops.n_elites(s["population_size"], s["elite_percent"]) >= s["population_size"]:
        raise UserError(f"strategy setting 'elite_percent' {s['elite_percent']} keeps every one of the "
                        f"{s['population_size']} individuals as an elite; nothing would be bred")
    _one_of("cross_weights", s["cross_weights"], CROSS_WEIGHTS)
    _one_of("mutation", s["mutation"], MUTATIONS)
    _one_of("selection", s["selection"], selection_ops.PARENT_METHODS)
    _one_of("survivor_selection", s["survivor_selection"], selection_ops.SURVIVOR_METHODS)
    _int("tournament_size", s["tournament_size"], 1)
    _rate("truncation_percent", s["truncation_percent"], lo_open=True)
    _rate("rank_pressure", s["rank_pressure"], 1.0, 2.0)
    for name in ("sigma", "step_size", "inertia", "cognitive", "social", "repel"):
        _rate(name, s[name], 0.0, math.inf)
    _rate("sigma_decay", s["sigma_decay"], lo_open=True)
    _rate("step_size_decay", s["step_size_decay"], lo_open=True)
    for name in ("combine", "cross"):
        v = s[name]
        if isinstance(v, str):
            _one_of(name, v, merge.METHODS)
        elif not isinstance(v, merge.MergeConfig):
            raise _bad(name, "a merge method name or a MergeConfig", v)


def as_merge_config(value) -> merge.MergeConfig:
    """A merge method name as a MergeConfig with mergekit's normalisation by the agreeing weights: a child of
    identical parents is that parent (PEFT's count normalisation would divide A and B by the number of parents,
    and ΔW by its square). A MergeConfig is kept as given."""
    return merge.MergeConfig(method=value, normalize="weight") if isinstance(value, str) else value


def decayed(value, decay, step) -> jax.Array:
    """value * decay ** step as a float32 scalar (sigma and the step size at generation `step`)."""
    return jnp.asarray(value, jnp.float32) * jnp.power(jnp.asarray(decay, jnp.float32), jnp.asarray(step, jnp.float32))


# ---- Params ----

@struct.dataclass
class Params:
    """The hyperparameters of GENOME that are plain numbers (float32 scalars; see SETTINGS for their meaning).
    A pytree: passed to jit as a traced argument, so changing a value does not recompile."""

    cross_rate: jax.Array
    individual_mutation_rate: jax.Array
    gene_mutation_rate: jax.Array
    sigma: jax.Array
    sigma_decay: jax.Array
    truncation_percent: jax.Array
    rank_pressure: jax.Array

    @classmethod
    def from_settings(cls, settings: dict[str, Any]):
        """The Params of `settings` (a mapping holding at least this class's field names)."""
        return cls(**{f.name: jnp.float32(settings[f.name]) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, float]:
        """JSON-able record {name: float} (the shortest decimal of each float32: 0.8, not 0.800000011920929)."""
        return {f.name: float(str(np.float32(getattr(self, f.name)))) for f in dataclasses.fields(self)}


def as_float32(params):
    """Every leaf a float32 array: a Python float (weakly typed) and a float32 array are different jit argument
    types, so a value set with `params.replace(sigma=0.05)` would otherwise compile once more."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


# ---- the strategy base class ----

@dataclasses.dataclass(frozen=True)
class Strategy:
    """Shapes and structure of a search (hashable: a static jit argument). Subclasses: `Genome`, `GenomePlus`.

        strategy, params = make_strategy("genome", population_size=8)      # or Genome(population_size=8)
        state = strategy.init(key, population, fitness, params)
        children, state = strategy.ask(key_ask, state, params)
        scores = ...                                   # for the children strategy.needs_score(state) marks
        state, metrics = strategy.tell(key_tell, state, children, scores, params)

    `genome_jax.evolve.evolve` runs this loop with checkpoints. cross / combine: merge method names or MergeConfigs
    (names become MergeConfigs, see `as_merge_config`). The elite count is `selection.n_elites(size, elite_percent)`.
    """

    population_size: int = SETTINGS["population_size"]
    combine: Any = SETTINGS["combine"]
    cross: Any = SETTINGS["cross"]
    n_parents: int = SETTINGS["n_parents"]
    cross_weights: str = SETTINGS["cross_weights"]
    mutation: str = SETTINGS["mutation"]
    elite_percent: float = SETTINGS["elite_percent"]
    selection: str = SETTINGS["selection"]
    tournament_size: int = SETTINGS["tournament_size"]

    name = "strategy"  # the method name (a class attribute, not a field)
    Params = Params  # this method's Params class

    def __post_init__(self):
        validate_settings({**SETTINGS, **self.structure()})
        object.__setattr__(self, "combine", as_merge_config(self.combine))
        object.__setattr__(self, "cross", as_merge_config(self.cross))

    @classmethod
    def from_settings(cls, settings: dict[str, Any]):
        """(strategy, params) from a full settings mapping (every key of SETTINGS)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in fields}), cls.Params.from_settings(settings)

    def structure(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def default_params(self):
        return self.Params.from_settings(SETTINGS)

    @property
    def n_elite(self) -> int:
        return selection_ops.n_elites(self.population_size, self.elite_percent)

    @property
    def num_children(self) -> int:
        """Children per `ask` (the leading size of the children pytree)."""
        raise NotImplementedError

    @property
    def population_sizes(self) -> frozenset[int]:
        """Every population-axis size this strategy uses (initial population, state slots, children): each must
        split evenly over the devices of a sharded run."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the structure (merge configs as {"__merge__": fields})."""
        out: dict[str, Any] = {"method": self.name}
        for k, v in self.structure().items():
            out[k] = {"__merge__": dataclasses.asdict(v)} if dataclasses.is_dataclass(v) else v
        return out

    def record(self, params) -> dict[str, Any]:
        """The JSON-able record of this strategy and its params (for run_config.json and a run's identity)."""
        return {"strategy": self.to_dict(), "params": params.to_dict()}

    def needs_score(self, state) -> jax.Array:
        """(C,) bool: the children from the last `ask` whose weights are new (to be exported and scored).
        Unchanged copies (elites, children neither crossed nor mutated, particles that did not move) are skipped;
        `tell` gives copies their source's fitness."""
        return state.child_source < 0

    def state_template(self, population, params):
        """The state's structure (ShapeDtypeStructs on this process's first device) for a population of
        `population`'s shapes (arrays or ShapeDtypeStructs): the target of a checkpoint restore, which then lands
        on that device whatever device count wrote it. Computes nothing."""
        n = population_size_of(population)
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0), population,
                                jax.ShapeDtypeStruct((n,), jnp.float32), params)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)

    def metrics(self, state) -> dict[str, jax.Array]:
        """Fitness of the population (best, mean, worst over finite entries), best ever, alive individuals and
        generations without a better best: a dict of scalars."""
        return _metrics(state.fitness, state.best_fitness, state.stall)

    def initial_population(self, key, experts, *, init_merge: bool = True):
        """`initial_population` of `population_size` individuals with this strategy's `combine` merge."""
        return initial_population(key, experts, self.population_size, merge_config=self.combine,
                                  init_merge=init_merge)

    def init(self, key, population, fitness, params):
        """The state of an initial population: pytree (n0, ...) (sizes: see the subclass) and fitness (n0,) its
        scores. key and params: unused by GENOME and GENOME+ (the evosax signature)."""
        n = population_size_of(population)
        self.check_initial_size(n)
        if tuple(jnp.shape(fitness)) != (n,):
            raise UserError(f"{self.name}: fitness has shape {tuple(jnp.shape(fitness))}, expected ({n},)")
        return self._init(population, jnp.asarray(fitness, jnp.float32))

    def check_initial_size(self, n: int) -> None:
        """Raise UserError when an initial population of n individuals does not fit this strategy."""
        raise NotImplementedError

    # _init / ask / tell: see the subclasses


@jax.jit
def _metrics(fitness, best_fitness, stall) -> dict[str, jax.Array]:
    s = fitness_stats(fitness)
    return {"best": s[0], "mean": s[1], "worst": s[2], "best_ever": best_fitness,
            "population": jnp.sum(jnp.isfinite(fitness)).astype(jnp.int32), "stall": stall}


# ---- pytree helpers (leaves carry the individual on axis 0) ----

def tree_take(tree, idx):
    """Gather individuals: idx (n,) int -> leaves (n, ...)."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)


def tree_index(tree, i):
    """One individual (leaves without the population axis)."""
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def tree_concat(a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def tree_where(mask, a, b):
    """Per individual: mask (n,) bool (or a scalar) picks from a, else b."""
    def sel(x, y):
        m = jnp.asarray(mask)
        return jnp.where(m.reshape(m.shape + (1,) * (x.ndim - m.ndim)), x, y)

    return jax.tree_util.tree_map(sel, a, b)


def tree_differs(a, b):
    """(n,) bool: which individuals differ anywhere between pytrees a and b."""
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: (x != y).reshape(x.shape[0], -1).any(1), a, b))
    out = leaves[0]
    for l in leaves[1:]:
        out = out | l
    return out


def population_size_of(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


# ---- fitness bookkeeping ----

def fitness_stats(fitness, mask=None):
    """(best, mean, worst) over finite entries (and mask); NaN when there is none. Returns (3,) float32."""
    f = jnp.asarray(fitness, jnp.float32)
    ok = jnp.isfinite(f) if mask is None else jnp.isfinite(f) & mask
    n = jnp.sum(ok)
    best = jnp.max(jnp.where(ok, f, -jnp.inf))
    worst = jnp.min(jnp.where(ok, f, jnp.inf))
    mean = jnp.sum(jnp.where(ok, f, 0.0)) / jnp.maximum(n, 1)
    return jnp.where(n > 0, jnp.stack([best, mean, worst]), jnp.nan)


def improves(candidate, incumbent):
    """Is a finite candidate fitness strictly better than the incumbent (a non-finite incumbent always loses)?"""
    return jnp.isfinite(candidate) & ((candidate > incumbent) | ~jnp.isfinite(incumbent))


def inherit_fitness(fitness, child_source, parent_fitness):
    """Unchanged copies take their source's fitness (never re-scored); others keep the given score."""
    src = jnp.maximum(child_source, 0)
    return jnp.where(child_source >= 0, parent_fitness[src], jnp.asarray(fitness, jnp.float32))


# ---- breeding ----

def parent_weights(key, parent_fitness, mode: str):
    """Merge weights (n, K) summing to 1 per child (crossover then returns a parent when all K are the same one, see
    `as_merge_config`). parent_fitness: (n, K)."""
    n, k = parent_fitness.shape
    if mode == "equal":
        return jnp.full((n, k), 1.0 / k, jnp.float32)
    if mode == "random":
        w = jax.random.uniform(key, (n, k), jnp.float32, minval=1e-3, maxval=1.0)
    else:  # fitness: roulette weights of each child's parents (shift for negatives, 0 for NaN)
        w = jax.vmap(selection_ops.roulette_weights)(parent_fitness)
    s = jnp.sum(w, axis=1, keepdims=True)
    return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 1.0 / k)


# ---- one program per module signature ----
# A generation runs as a small jitted plan (everything decided per individual: parents, merge weights, which
# children are crossed, which individuals a mutation picks) and one jitted program per module, called for every
# module with its index traced. XLA then compiles one program per distinct module shape (4 for SmolLM2: q/o, k/v,
# gate/up, down) instead of one program over all 210 modules (about a minute of XLA:CPU compile per process).
# The strategy object is the programs' static argument, Params (inside the plan) a traced one.

def module_names(tree) -> list:
    """The population's modules: its top-level keys, sorted ([None]: the tree is not a dict, one module)."""
    return sorted(tree) if isinstance(tree, dict) and tree else [None]


def module_of(tree, name):
    return tree if name is None else tree[name]


def from_modules(names: list, parts: list):
    """Inverse of `module_names` / `module_of`."""
    return parts[0] if names == [None] else dict(zip(names, parts))


def offspring_plan(key, fitness, n: int, strategy: Strategy, params, step) -> dict:
    """Everything about n children that is decided per individual (not per gene): a dict of small arrays.

    parents (n, K) int32; crossed (n,) bool; weights (n, K) (when n_parents > 1); k_cross: the crossover key
    (module m merges with fold_in(k_cross, m)); picked (n,) bool and gene_keys (n, g): the mutation's picks and
    per-individual gene keys (module m uses fold_in(gene_key, m)); sigma and gene_rate: the mutation's numbers."""
    k_sel, k_w, k_cross, k_rate, k_mut = jax.random.split(key, 5)
    kp = strategy.n_parents
    parents = selection_ops.select_parents(
        k_sel,
        fitness,
        n * kp,
        method=strategy.selection,
        tournament_size=strategy.tournament_size,
        truncation_percent=params.truncation_percent,
        rank_pressure=params.rank_pressure,
    ).reshape(n, kp)
    plan = {"parents": parents, "k_cross": k_cross, "crossed": jnp.zeros((n,), bool)}
    if kp > 1:  # crossover is structure; cross_rate (0 included) only decides which children use it
        plan["weights"] = parent_weights(k_w, jnp.asarray(fitness, jnp.float32)[parents], strategy.cross_weights)
        plan["crossed"] = jax.random.bernoulli(k_rate, params.cross_rate, (n,))
    n_gene_keys = 1 if strategy.mutation == "gaussian" else 2
    plan["picked"], plan["gene_keys"] = mutation_ops.pick_individuals(k_mut, n, params.individual_mutation_rate,
                                                                      n_gene_keys)
    plan["sigma"] = decayed(params.sigma, params.sigma_decay, step)
    plan["gene_rate"] = jnp.asarray(params.gene_mutation_rate, jnp.float32)
    return plan


def breed_module(plan: dict, mi, module, strategy: Strategy, front=None):
    """The n children's module `mi` (module: this module's pytree of (P, ...) parents): copy parents[:, 0], merge
    the crossed children's parents, mutate. front: optional rows (m, ...) placed before the children (elites,
    GENOME+'s moved particles), joined before the Gaussian mutation so that it updates the one output buffer in
    place (a join after it made XLA copy the whole buffer on every mutated row). Returns (rows (m + n, ...),
    mutated (n,) bool of the children)."""
    parents = plan["parents"]
    children = tree_take(module, parents[:, 0])
    if "weights" in plan:
        merged = merge.crossover(jax.random.fold_in(plan["k_cross"], mi), {"m": module}, parents,
                                 plan["weights"], config=strategy.cross)["m"]
        children = tree_where(plan["crossed"], merged, children)
    fold = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(0, None)), in_axes=(0, None))
    keys = fold(plan["gene_keys"], mi)  # (n, g)
    rates = dict(gene_rate=plan["gene_rate"], sigma=plan["sigma"])
    if strategy.mutation == "gaussian":
        picked = plan["picked"]
        m = 0 if front is None else population_size_of(front)
        if m:  # the front rows are never picked (their keys are placeholders, never drawn from)
            children = tree_concat(front, children)
            picked = jnp.concatenate([jnp.zeros((m,), bool), picked])
            keys = jnp.concatenate([jnp.repeat(keys[:1], m, axis=0), keys])
        out, mutated = mutation_ops.gaussian_mutation_picked(keys[:, 0], picked, children, **rates)
        return out, mutated[m:]
    out, mutated = mutation_ops.svd_mutation_picked(keys, plan["picked"], {"m": children}, **rates)
    return (out["m"] if front is None else tree_concat(front, out["m"])), mutated


@functools.partial(jax.jit, static_argnames=("strategy",))
def _offspring_module(plan, mi, module, changed, strategy: Strategy):
    """One module of the children, with the elites' copies (plan["elites"]) in front; changed |= mutated."""
    front = tree_take(module, plan["elites"]) if "elites" in plan else None
    children, mutated = breed_module(plan, mi, module, strategy, front=front)
    return children, changed | mutated


def breed(plan: dict, population, strategy: Strategy):
    """Every module of the children of `plan` (elites first when plan has "elites"): one call per module.
    Returns (children, changed (n,) bool: crossed or mutated anywhere)."""
    names = module_names(population)
    parts, changed = [], plan["crossed"]
    for mi, name in enumerate(names):
        child, changed = _offspring_module(plan, jnp.int32(mi), module_of(population, name), changed,
                                           strategy=strategy)
        parts.append(child)
    return from_modules(names, parts), changed


_offspring_plan = jax.jit(offspring_plan, static_argnames=("n", "strategy"))


def make_offspring(key, population, fitness, n: int, strategy: Strategy, params, step):
    """n children: parent selection -> crossover (probability cross_rate) -> mutation.

    population: pytree (P, ...); fitness: (P,). Returns (children (n, ...), parents (n, K) int32,
    changed (n,) bool). A child that was neither crossed nor mutated is an exact copy of parents[:, 0].
    One small plan, then one program per module (see `offspring_plan`, `breed`).
    """
    plan = _offspring_plan(key, fitness, n, strategy, as_float32(params), step)
    children, changed = breed(plan, population, strategy)
    return children, plan["parents"], changed


@jax.jit
def pick_row(cond, i, tree, old):
    """tree_where(cond, tree[i], old) for one module (tree (P, ...), old without the P axis)."""
    return tree_where(cond, tree_index(tree, i), old)


def per_module(fn, names: list, *trees):
    """fn(*modules) for every module (jitted fn: one compile per module shape); results joined back per output."""
    outs = [fn(*(module_of(t, name) for t in trees)) for name in names]
    if isinstance(outs[0], tuple):
        return tuple(from_modules(names, list(col)) for col in zip(*outs))
    return from_modules(names, outs)


def initial_population(key, experts, n: int, *, merge_config=None, init_merge: bool = True):
    """GENOME's initial population of n individuals from K experts (pytree (K, ...)).

    init_merge=True: n children, each a merge of two distinct random experts with weights (w, 1 - w),
    w ~ U(0, 1), by `merge_config` (default: linear). init_merge=False: the experts themselves (n must be >= K;
    any extra individuals are random pairwise merges). Returns a pytree (n, ...). Pure JAX (jax.eval_shape gives
    its shapes without computing it).
    """
    k_experts = population_size_of(experts)
    if merge_config is None:
        merge_config = as_merge_config("linear")
    if k_experts < 1:
        raise UserError("initial population: no experts given")
    if not init_merge and n < k_experts:
        raise UserError(f"initial population: init_merge=False keeps all {k_experts} experts but the population "
                        f"size is {n}")
    n_merge = n if init_merge else n - k_experts
    if n_merge and k_experts < 2:
        raise UserError("initial population: random pairwise merges need at least 2 experts")
    parts = [] if init_merge else [experts]
    if n_merge:
        k_i, k_j, k_w, k_m = jax.random.split(key, 4)
        i = jax.random.randint(k_i, (n_merge,), 0, k_experts)
        j = jax.random.randint(k_j, (n_merge,), 0, k_experts - 1)
        j = j + (j >= i)  # a distinct partner
        w = jax.random.uniform(k_w, (n_merge,), jnp.float32)
        pairs = jnp.stack([i, j], axis=1).astype(jnp.int32)
        weights = jnp.stack([w, 1.0 - w], axis=1)
        parts.append(merge.crossover(k_m, experts, pairs, weights, config=merge_config))
    out = parts[0]
    for p in parts[1:]:
        out = tree_concat(out, p)
    return out
