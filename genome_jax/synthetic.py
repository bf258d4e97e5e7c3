"""TEST PROBLEM (no LLM): a synthetic fitness for tests and benchmarks of the search itself.

A hidden target adapter is a fixed mix of the experts, ΔW*_m = sum_k c_k B_k,m A_k,m per module m. An individual
scores minus its relative distance to the target over all modules,

    fitness(i) = - sqrt(sum_m ||B_i,m A_i,m - ΔW*_m||_F^2) / sqrt(sum_m ||ΔW*_m||_F^2)

so 0 is a perfect match and the experts themselves score around -1. The distance is computed from the small
factors only: with S = [B_i, -c_1 B_1, ..., -c_K B_K] (d_out, (K+1) r) and T = [A_i; A_1; ...; A_K]
((K+1) r, d_in), ||S T||_F^2 = sum((S^T S) * (T T^T)) (the trace of a product of two small Gram matrices), so no
dense ΔW is formed. Deterministic: same inputs, same bits.

`run_synthetic` runs a strategy on it through the library's one generation loop (`genome_jax.evolve`), with
checkpoints, for the tests and the benchmarks; `synthetic_experts` makes small random expert factors.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from genome_jax.checkpoint import RunCheckpointer
from genome_jax.errors import UserError
from genome_jax.evolve import evolve, initial_keys
from genome_jax.sharding import ShardedStrategy, replicate

log = logging.getLogger(__name__)

__all__ = ["SyntheticProblem", "make_problem", "score", "synthetic_experts", "run_synthetic", "SyntheticRun"]


@struct.dataclass
class SyntheticProblem:
    """The hidden target: experts (K, ...) and mixing coefficients c (K,)."""

    experts: Any  # {module: {"A": (K, r, d_in), "B": (K, d_out, r)}}
    coeffs: jax.Array  # (K,)
    target_sq_norm: jax.Array  # () sum_m ||ΔW*_m||_F^2


def synthetic_experts(seed: int = 0, n_experts: int = 4, n_layers: int = 2, d_model: int = 32, rank: int = 4,
                      modules: Sequence[str] = ("q_proj", "v_proj"), d_ff: int | None = None):
    """Small random expert factors {"model.layers.L.<kind>.<name>": {"A": (K, r, d_in), "B": (K, d_out, r)}}.

    A ~ N(0, 1/d_in), B ~ N(0, 1/r), so every ΔW entry is O(1/sqrt(d_in)) (scale-free tests).
    """
    rng = np.random.default_rng(seed)
    d_ff = d_ff or 2 * d_model
    shapes = {"q_proj": (d_model, d_model), "k_proj": (d_model, d_model), "v_proj": (d_model, d_model),
              "o_proj": (d_model, d_model), "gate_proj": (d_model, d_ff), "up_proj": (d_model, d_ff),
              "down_proj": (d_ff, d_model)}
    out = {}
    for layer in range(n_layers):
        for name in sorted(modules):
            d_in, d_out = shapes[name]
            kind = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            a = rng.standard_normal((n_experts, rank, d_in)) / np.sqrt(d_in)
            b = rng.standard_normal((n_experts, d_out, rank)) / np.sqrt(rank)
            out[f"model.layers.{layer}.{kind}.{name}"] = {"A": jnp.asarray(a, jnp.float32),
                                                          "B": jnp.asarray(b, jnp.float32)}
    return dict(sorted(out.items()))


def _lowrank_sq_norm_vs_target(a, b, ea, eb, c):
    """||b a - sum_k c_k eb_k ea_k||_F^2 for one module of one individual. a: (r, d_in), b: (d_out, r)."""
    k, r, d_in = ea.shape
    s = jnp.concatenate([b, jnp.moveaxis(-c[:, None, None] * eb, 0, 1).reshape(b.shape[0], k * r)], axis=1)
    t = jnp.concatenate([a, ea.reshape(k * r, d_in)], axis=0)
    return jnp.sum((s.T @ s) * (t @ t.T))


def make_problem(experts, coeffs=None, *, seed: int = 1234) -> SyntheticProblem:
    """The hidden target from K experts: coeffs (K,) given, or drawn once from `seed` (positive, summing to 1)."""
    k = jax.tree_util.tree_leaves(experts)[0].shape[0]
    if coeffs is None:
        coeffs = np.random.default_rng(seed).dirichlet(np.full(k, 4.0))  # a real mix, no expert dominates
    c = jnp.asarray(coeffs, jnp.float32)
    if c.shape != (k,):
        raise UserError(f"synthetic problem: {c.shape[0] if c.ndim else 0} coefficients for {k} experts")
    zero_a = {m: jnp.zeros_like(v["A"][0]) for m, v in experts.items()}
    zero_b = {m: jnp.zeros_like(v["B"][0]) for m, v in experts.items()}
    sq = sum(_lowrank_sq_norm_vs_target(zero_a[m], zero_b[m], v["A"], v["B"], c) for m, v in experts.items())
    return SyntheticProblem(experts=experts, coeffs=c, target_sq_norm=jnp.asarray(sq, jnp.float32))


@jax.jit
def score(problem: SyntheticProblem, factors) -> jax.Array:
    """Fitness (P,) of a population pytree {module: {"A": (P, r, d_in), "B": (P, d_out, r)}} (0 is the optimum)."""
    def one(ind):
        d = 0.0
        for m, v in problem.experts.items():
            d = d + _lowrank_sq_norm_vs_target(ind[m]["A"], ind[m]["B"], v["A"], v["B"], problem.coeffs)
        return -jnp.sqrt(jnp.maximum(d, 0.0) / problem.target_sq_norm)

    return jax.vmap(one)(factors)


def experts_digest(experts) -> str:
    """Short sha256 of the experts' arrays (identifies the problem in the run config)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(experts)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


@dataclasses.dataclass
class SyntheticRun:
    state: Any
    best: Any  # best individual's factors (numpy)
    best_fitness: float
    generations: int  # completed generations
    resumed_from: int | None  # checkpoint step the run continued from (None: fresh start)
    evaluations: int  # individuals scored by this process
    history: list[dict]  # metrics of each generation this process made (genome_jax.evolve), oldest first


def run_synthetic(out_dir, strategy, params, *, seed: int, generations: int, experts=None, coeffs=None,
                  patience: int = 0, keep: int = 3, async_save: bool = True,
                  on_generation: Callable[[int, Any, dict], None] | None = None, mesh=None) -> SyntheticRun:
    """Run (or resume) `strategy` with `params` on the synthetic test problem for `generations` generations,
    checkpointing each one (`genome_jax.evolve.evolve`).

    out_dir/checkpoints holds the orbax steps and run_config.json; re-running with the same arguments resumes
    at the last complete generation and ends bit-identical to an uninterrupted run. `generations` and `patience`
    may change between runs (they are not part of the run identity). on_generation(generation, state, metrics) is
    called after each checkpoint is issued (tests use it to inject faults). mesh: a
    `genome_jax.sharding.population_mesh`; the state is then sharded over it, and a resume restores the checkpoint
    straight into that layout (any device count).
    """
    whole = lambda tree: tree  # noqa: E731
    if mesh is not None:  # population axis sharded over mesh (genome_jax.sharding); same results, any device count
        strategy = ShardedStrategy(strategy, mesh)
        # the fitness sees whole individuals, as an evaluator does (a batched dot over a split axis would sum in
        # another order: last-bit differences that are the scorer's, not the search's)
        whole = lambda tree: replicate(tree, mesh)  # noqa: E731
    experts = experts if experts is not None else synthetic_experts(seed)
    problem = make_problem(experts, coeffs, seed=seed + 1)
    config = {
        "problem": "synthetic",
        "seed": int(seed),
        "experts": experts_digest(experts),
        "coeffs": [float(x) for x in np.asarray(problem.coeffs)],
        **strategy.record(params),
    }
    k_pop, k_run = initial_keys(jax.random.PRNGKey(seed))
    history: list[dict] = []

    def report(generation: int, state, metrics: dict) -> None:
        history.append({"generation": generation, **metrics})
        if on_generation is not None:
            on_generation(generation, state, metrics)

    def resumed(generation: int, state) -> None:
        log.info("resuming %s from generation %d", out_dir, generation)

    with RunCheckpointer(Path(out_dir) / "checkpoints", config, keep=keep, async_save=async_save) as ckpt:
        run = evolve(k_run, strategy, params, lambda: strategy.initial_population(k_pop, experts),
                     lambda children, need: score(problem, whole(children)), max_iter=generations,
                     patience=patience, checkpointer=ckpt, on_generation=report, on_resume=resumed)
    state = run.state
    best = jax.tree_util.tree_map(np.asarray, state.best)
    return SyntheticRun(state=state, best=best, best_fitness=float(state.best_fitness), generations=run.generation,
                        resumed_from=run.resumed_from, evaluations=run.evaluations, history=history)
