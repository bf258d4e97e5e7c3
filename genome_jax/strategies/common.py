"""Pieces shared by the GENOME and GENOME+ strategies: parameters, pytree helpers, offspring, initialisation.

A population here is the `factors` pytree of `Population` (leaves with the individual on axis 0):
`{module_path: {"A": (P, r, d_in), "B": (P, d_out, r)}}`. Crossover is `genome_jax.operators.merge.crossover`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax

from genome_jax.errors import UserError
from genome_jax.operators import mutation as mutation_ops
from genome_jax.operators import selection as selection_ops
from genome_jax.operators.succession import SuccessionConfig

Factors = Any  # the population pytree
ScalarOrSchedule = Union[float, Callable[[Any], Any]]

MUTATIONS = ("gaussian", "svd")
CROSS_WEIGHTS = ("random", "equal", "fitness")


def _merge():
    # Looked up at call time: the merge operators live in their own module (another helper's).
    from genome_jax.operators import merge

    return merge


@dataclasses.dataclass(frozen=True)
class StrategyParams:
    """Static configuration of a strategy (hashable: passed to jit as a static argument).

    Sizes: `genome` keeps exactly `population_size` individuals; `genome_plus` starts from `population_size`
    (the initial population), adds `n_offspring` children per generation (None: `population_size`) and trims the
    population back to `max_population_size` (None: 2 x population_size) by survivor selection.
    `combine` (initial population) and `cross` (crossover) are merge method names or `MergeConfig`s.
    `sigma` / `step_size` are floats (then decayed by `sigma_decay` / `step_size_decay` per generation) or optax
    schedules. `patience` > 0 enables early stopping after that many generations without a better best.
    `max_generations` sizes the fitness history kept in the state.
    """

    population_size: int = 10
    max_population_size: int | None = None
    n_offspring: int | None = None
    combine: Any = "ties"
    cross: Any = "ties"
    n_parents: int = 2
    cross_rate: float = 0.8
    cross_weights: str = "random"  # random (U(0,1), normalised) | equal | fitness (roulette weights of parents)
    mutation: str = "gaussian"  # gaussian | svd
    individual_mutation_rate: float = 0.15
    gene_mutation_rate: float = 0.01
    sigma: ScalarOrSchedule = 0.01
    sigma_decay: float = 1.0
    elite_percent: float = 0.02
    selection: str = "roulette"  # parent selection: roulette | tournament | truncation | rank
    tournament_size: int = 3
    truncation_percent: float = 0.5
    rank_pressure: float = 1.5
    survivor_selection: str = "truncation"  # genome_plus trimming: truncation | roulette | rank | tournament
    inertia: float = 0.4
    cognitive: float = 0.3
    social: float = 0.5
    repel: float = 0.1
    step_size: ScalarOrSchedule = 1.0
    step_size_decay: float = 0.95
    patience: int = 0
    max_generations: int = 100

    def __post_init__(self):
        validate_params(self)

    # ---- derived, static ----
    @property
    def capacity(self) -> int:
        """genome_plus: slots in the population arrays (max population)."""
        return self.max_population_size if self.max_population_size is not None else 2 * self.population_size

    @property
    def offspring_per_generation(self) -> int:
        return self.n_offspring if self.n_offspring is not None else self.population_size

    def n_elite(self, population: int) -> int:
        """ceil(elite_percent * population); at least one elite when elite_percent > 0."""
        return int(math.ceil(self.elite_percent * population - 1e-9))

    @property
    def cross_config(self):
        return _merge_config(self.cross)

    @property
    def combine_config(self):
        return _merge_config(self.combine)

    @property
    def sigma_schedule(self) -> ScalarOrSchedule:
        return _schedule(self.sigma, self.sigma_decay)

    @property
    def succession_config(self) -> SuccessionConfig:
        return SuccessionConfig(
            inertia=self.inertia,
            cognitive=self.cognitive,
            social=self.social,
            repel=self.repel,
            step_size=_schedule(self.step_size, self.step_size_decay),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (for the run config beside the checkpoints)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if callable(v):
                raise UserError(
                    f"StrategyParams.{f.name} is a Python callable and cannot be recorded in the run config; "
                    f"give a float and '{f.name}_decay' instead"
                )
            if dataclasses.is_dataclass(v):
                v = {"__merge__": dataclasses.asdict(v)}
            out[f.name] = v
        return out


def _merge_config(value):
    if isinstance(value, str):
        # mergekit's normalisation by the agreeing weights: a child of identical parents is that parent (PEFT's
        # count normalisation would divide A and B by the number of parents, and ΔW by its square)
        return _merge().MergeConfig(method=value, normalize="weight")
    return value


def _schedule(value: ScalarOrSchedule, decay: float) -> ScalarOrSchedule:
    if callable(value) or decay == 1.0:
        return value
    return optax.exponential_decay(init_value=float(value), transition_steps=1, decay_rate=decay)


def _rate(name, v, lo=0.0, hi=1.0, lo_open=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        lo_b = "(" if lo_open else "["
        raise UserError(f"StrategyParams: '{name}' must be in {lo_b}{lo}, {hi}], got {v!r}")


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UserError(f"StrategyParams: '{name}' must be an integer >= {lo}, got {v!r}")


def validate_params(p: StrategyParams) -> None:
    """Raise UserError naming the first bad field."""
    _int("population_size", p.population_size, 2)
    if p.max_population_size is not None:
        _int("max_population_size", p.max_population_size, 2)
        if p.max_population_size < p.population_size:
            raise UserError(
                f"StrategyParams: 'max_population_size' ({p.max_population_size}) must be >= 'population_size' "
                f"({p.population_size})"
            )
    if p.n_offspring is not None:
        _int("n_offspring", p.n_offspring, 1)
    _int("n_parents", p.n_parents, 1)
    for name in ("cross_rate", "individual_mutation_rate", "gene_mutation_rate", "elite_percent"):
        _rate(name, getattr(p, name))
    if p.n_elite(p.population_size) >= p.population_size:
        raise UserError(
            f"StrategyParams: 'elite_percent' {p.elite_percent} keeps every one of the {p.population_size} "
            "individuals as an elite; nothing would be bred"
        )
    if p.cross_weights not in CROSS_WEIGHTS:
        raise UserError(f"StrategyParams: 'cross_weights' must be one of {', '.join(CROSS_WEIGHTS)}, got {p.cross_weights!r}")
    if p.mutation not in MUTATIONS:
        raise UserError(f"StrategyParams: 'mutation' must be one of {', '.join(MUTATIONS)}, got {p.mutation!r}")
    if p.selection not in selection_ops.PARENT_METHODS:
        raise UserError(
            f"StrategyParams: 'selection' must be one of {', '.join(selection_ops.PARENT_METHODS)}, got {p.selection!r}"
        )
    if p.survivor_selection not in selection_ops.SURVIVOR_METHODS:
        raise UserError(
            "StrategyParams: 'survivor_selection' must be one of "
            f"{', '.join(selection_ops.SURVIVOR_METHODS)}, got {p.survivor_selection!r}"
        )
    _int("tournament_size", p.tournament_size, 1)
    _rate("truncation_percent", p.truncation_percent, lo_open=True)
    _rate("rank_pressure", p.rank_pressure, 1.0, 2.0)
    for name in ("sigma", "step_size"):
        v = getattr(p, name)
        if not callable(v):
            _rate(name, v, 0.0, math.inf)
    _rate("sigma_decay", p.sigma_decay, lo_open=True)
    _rate("step_size_decay", p.step_size_decay, lo_open=True)
    for name in ("inertia", "cognitive", "social", "repel"):
        _rate(name, getattr(p, name), 0.0, math.inf)
    _int("patience", p.patience, 0)
    _int("max_generations", p.max_generations, 1)
    for name in ("combine", "cross"):
        v = getattr(p, name)
        if isinstance(v, str):
            methods = getattr(_merge_module_or_none(), "METHODS", None)
            if methods is not None and v not in methods:
                raise UserError(f"StrategyParams: '{name}' must be one of {', '.join(methods)}, got {v!r}")
        elif not (dataclasses.is_dataclass(v) and hasattr(v, "method")):
            raise UserError(f"StrategyParams: '{name}' must be a merge method name or a MergeConfig, got {v!r}")


def _merge_module_or_none():
    try:
        return _merge()
    except ImportError:
        return None


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


def empty_history(params: StrategyParams) -> jax.Array:
    """(max_generations + 1, 3) of NaN: rows = generation, columns = best, mean, worst."""
    return jnp.full((params.max_generations + 1, 3), jnp.nan, jnp.float32)


def record_history(history, generation, stats):
    return history.at[generation].set(stats, mode="drop")  # runs past max_generations keep no history


def improves(candidate, incumbent):
    """Is a finite candidate fitness strictly better than the incumbent (a non-finite incumbent always loses)?"""
    return jnp.isfinite(candidate) & ((candidate > incumbent) | ~jnp.isfinite(incumbent))


def inherit_fitness(fitness, child_source, parent_fitness):
    """Unchanged copies take their source's fitness (never re-scored); others keep the given score."""
    src = jnp.maximum(child_source, 0)
    return jnp.where(child_source >= 0, parent_fitness[src], jnp.asarray(fitness, jnp.float32))


def raw_key(key) -> jax.Array:
    """A legacy uint32 (2,) key (typed keys are unwrapped) so the state checkpoints as a plain array."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key.astype(jnp.uint32)


# ---- breeding ----

def parent_weights(key, parent_fitness, mode: str):
    """Merge weights (n, K) summing to 1 per child (crossover then returns a parent when all K are the same one, see
    `_merge_config`). parent_fitness: (n, K)."""
    n, k = parent_fitness.shape
    if mode == "equal":
        return jnp.full((n, k), 1.0 / k, jnp.float32)
    if mode == "random":
        w = jax.random.uniform(key, (n, k), jnp.float32, minval=1e-3, maxval=1.0)
    else:  # fitness: roulette weights of each child's parents (shift for negatives, 0 for NaN)
        w = jax.vmap(selection_ops.roulette_weights)(parent_fitness)
    s = jnp.sum(w, axis=1, keepdims=True)
    return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 1.0 / k)


def mutate(key, factors, params: StrategyParams, step):
    """The configured mutation. Returns (factors', mutated: (n,) bool)."""
    fn = mutation_ops.gaussian_mutation if params.mutation == "gaussian" else mutation_ops.svd_mutation
    return fn(
        key,
        factors,
        individual_rate=params.individual_mutation_rate,
        gene_rate=params.gene_mutation_rate,
        sigma=params.sigma_schedule,
        step=step,
    )


# ---- one program per module signature ----
# A generation runs as a small jitted plan (everything decided per individual: parents, merge weights, which
# children are crossed, which individuals a mutation picks) and one jitted program per module, called for every
# module with its index traced. XLA then compiles one program per distinct module shape (4 for SmolLM2: q/o, k/v,
# gate/up, down) instead of one program over all 210 modules (about a minute of XLA:CPU compile per process).

def module_names(tree) -> list:
    """The population's modules: its top-level keys, sorted ([None]: the tree is not a dict, one module)."""
    return sorted(tree) if isinstance(tree, dict) and tree else [None]


def module_of(tree, name):
    return tree if name is None else tree[name]


def from_modules(names: list, parts: list):
    """Inverse of `module_names` / `module_of`."""
    return parts[0] if names == [None] else dict(zip(names, parts))


def offspring_plan(key, fitness, n: int, params: StrategyParams, step) -> dict:
    """Everything about n children that is decided per individual (not per gene): a dict of small arrays.

    parents (n, K) int32; crossed (n,) bool; weights (n, K) (only when crossover is on); k_cross: the crossover
    key (module m merges with fold_in(k_cross, m)); picked (n,) bool and gene_keys (n, g): the mutation's picks
    and per-individual gene keys (module m uses fold_in(gene_key, m)); sigma: the resolved noise scale."""
    k_sel, k_w, k_cross, k_rate, k_mut = jax.random.split(key, 5)
    kp = params.n_parents
    parents = selection_ops.select_parents(
        k_sel,
        fitness,
        n * kp,
        method=params.selection,
        tournament_size=params.tournament_size,
        truncation_percent=params.truncation_percent,
        rank_pressure=params.rank_pressure,
    ).reshape(n, kp)
    plan = {"parents": parents, "k_cross": k_cross, "crossed": jnp.zeros((n,), bool)}
    if params.cross_rate > 0 and kp > 1:
        plan["weights"] = parent_weights(k_w, jnp.asarray(fitness, jnp.float32)[parents], params.cross_weights)
        plan["crossed"] = jax.random.bernoulli(k_rate, params.cross_rate, (n,))
    n_gene_keys = 1 if params.mutation == "gaussian" else 2
    plan["picked"], plan["gene_keys"] = mutation_ops.pick_individuals(k_mut, n, params.individual_mutation_rate,
                                                                      n_gene_keys)
    plan["sigma"] = mutation_ops.resolve_schedule(params.sigma_schedule, step)
    return plan


def breed_module(plan: dict, mi, module, params: StrategyParams):
    """The n children's module `mi` (module: this module's pytree of (P, ...) parents): copy parents[:, 0], merge
    the crossed children's parents, mutate. Returns (children (n, ...), mutated (n,) bool)."""
    parents = plan["parents"]
    children = tree_take(module, parents[:, 0])
    if "weights" in plan:
        merged = _merge().crossover(jax.random.fold_in(plan["k_cross"], mi), {"m": module}, parents,
                                    plan["weights"], config=params.cross_config)["m"]
        children = tree_where(plan["crossed"], merged, children)
    fold = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(0, None)), in_axes=(0, None))
    keys = fold(plan["gene_keys"], mi)  # (n, g)
    rates = dict(gene_rate=params.gene_mutation_rate, sigma=plan["sigma"])
    if params.mutation == "gaussian":
        return mutation_ops.gaussian_mutation_picked(keys[:, 0], plan["picked"], children, **rates)
    out, mutated = mutation_ops.svd_mutation_picked(keys, plan["picked"], {"m": children}, **rates)
    return out["m"], mutated


@functools.partial(jax.jit, static_argnames=("params",))
def _offspring_module(plan, mi, module, changed, params: StrategyParams):
    """One module of the children, with the elites' copies (plan["elites"]) in front; changed |= mutated."""
    children, mutated = breed_module(plan, mi, module, params)
    if "elites" in plan:
        children = tree_concat(tree_take(module, plan["elites"]), children)
    return children, changed | mutated


def breed(plan: dict, population, params: StrategyParams):
    """Every module of the children of `plan` (elites first when plan has "elites"): one call per module.
    Returns (children, changed (n,) bool: crossed or mutated anywhere)."""
    names = module_names(population)
    parts, changed = [], plan["crossed"]
    for mi, name in enumerate(names):
        child, changed = _offspring_module(plan, jnp.int32(mi), module_of(population, name), changed, params=params)
        parts.append(child)
    return from_modules(names, parts), changed


_offspring_plan = jax.jit(offspring_plan, static_argnames=("n", "params"))


def make_offspring(key, population, fitness, n: int, params: StrategyParams, step):
    """n children: parent selection -> crossover (probability cross_rate) -> mutation.

    population: pytree (P, ...); fitness: (P,). Returns (children (n, ...), parents (n, K) int32,
    changed (n,) bool). A child that was neither crossed nor mutated is an exact copy of parents[:, 0].
    One small plan, then one program per module (see `offspring_plan`, `breed`).
    """
    plan = _offspring_plan(key, fitness, n, params, step)
    children, changed = breed(plan, population, params)
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


def initial_population(key, experts, n: int | None = None, *, params: StrategyParams | None = None,
                       merge_config=None, init_merge: bool = True):
    """GENOME's initial population from K experts (pytree (K, ...)).

    init_merge=True: n children, each a merge of two distinct random experts with weights (w, 1 - w),
    w ~ U(0, 1), by `merge_config` (default: params.combine). init_merge=False: the experts themselves (n must
    be >= K; any extra individuals are random pairwise merges). n defaults to params.population_size, else K.
    Returns a pytree (n, ...).
    """
    k_experts = population_size_of(experts)
    if n is None:
        n = params.population_size if params is not None else k_experts
    if merge_config is None:
        merge_config = params.combine_config if params is not None else _merge_config("linear")
    if k_experts < 1:
        raise UserError("initial population: no experts given")
    if not init_merge and n < k_experts:
        raise UserError(f"initial population: init_merge=False keeps all {k_experts} experts but the population size is {n}")
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
        parts.append(_merge().crossover(k_m, experts, pairs, weights, config=merge_config))
    out = parts[0]
    for p in parts[1:]:
        out = tree_concat(out, p)
    return out


def needs_score(state) -> jax.Array:
    """(C,) bool: the children from the last `ask` whose weights are new (to be exported and scored).

    Unchanged copies (elites, children neither crossed nor mutated, particles that did not move) and empty
    slots are skipped; `tell` gives copies their source's fitness.
    """
    need = state.child_source < 0
    alive = getattr(state, "child_alive", None)
    return need if alive is None else need & alive
