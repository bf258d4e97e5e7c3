"""The generation loop: one for `genome run`, the synthetic TEST PROBLEM and benchmarks.

    result = evolve(key, strategy, params, initial, fitness, max_iter=50, patience=0,
                    checkpointer=RunCheckpointer(...), on_generation=report)

- `initial()`: the initial population, a pytree (P, ...), built by pure JAX code (its shapes come from
  `jax.eval_shape(initial)` without running it: the restore target of a resumed run). Called on a fresh start only.
- `fitness(children, need) -> scores`: children (C, ...) and need (C,) numpy bool, the children to score (the
  others are unchanged copies whose fitness `tell` inherits); returns (C,) scores (entries where need is False are
  ignored; NaN marks a failed evaluation). Generation 0 scores the whole initial population.
- `checkpointer`: `restore_latest(target) -> Restored | None` and `save(step, state)` (genome_jax.checkpoint's
  RunCheckpointer). A fresh start saves generation 0; a resume continues from the latest intact step.
- `on_generation(generation, state, metrics)`: after each generation's checkpoint is issued (also after
  generation 0). metrics: the strategy's (Python numbers: best, mean, worst, best_ever, population, stall, ...)
  plus "scored" (individuals this generation scored) and "time_s" ({"operators", "checkpoint"}: seconds).
- `on_resume(generation, state)`: once, when the run continues from a checkpoint.

Keys: generation g (0-based) asks with split(fold_in(key_run, g))[0] and tells with [1], so a resumed run draws the
same numbers as an uninterrupted one and ends bit-identical. The loop stops after `max_iter` generations, or
earlier when `patience` > 0 generations in a row found no better best. Neither is part of a run's identity:
re-running with a larger `max_iter` extends a finished run.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from genome_jax import stopping

__all__ = ["Evolution", "evolve", "generation_keys", "initial_keys"]


@dataclasses.dataclass
class Evolution:
    state: Any  # the strategy state after the last generation
    generation: int  # completed generations
    resumed_from: int | None  # checkpoint step the run continued from (None: fresh start)
    stopped_early: bool  # stopped by `patience` before max_iter
    evaluations: int  # individuals scored by this call


def initial_keys(key) -> tuple[jax.Array, jax.Array]:
    """(key for the initial population, key of the run) from a run's key (e.g. PRNGKey(seed))."""
    k_pop, k_run = jax.random.split(key)
    return k_pop, k_run


def generation_keys(key, generation: int) -> tuple[jax.Array, jax.Array]:
    """(ask key, tell key) of generation `generation` (0-based: the generation being made) of a run's key."""
    k_ask, k_tell = jax.random.split(jax.random.fold_in(key, generation))
    return k_ask, k_tell


def _host_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        a = np.asarray(v)
        out[k] = int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
    return out


def evolve(key, strategy, params, initial: Callable[[], Any], fitness: Callable[[Any, np.ndarray], Any], *,
           max_iter: int, patience: int = 0, checkpointer=None,
           on_generation: Callable[[int, Any, dict], None] | None = None,
           on_resume: Callable[[int, Any], None] | None = None) -> Evolution:
    """Run (or resume) `strategy` to `max_iter` generations; see the module docstring. key: the run's key (the
    initial population's own key is the caller's). Returns an Evolution."""
    evaluations = 0
    restored = None
    if checkpointer is not None:
        restored = checkpointer.restore_latest(strategy.state_template(jax.eval_shape(initial), params))

    def save(generation: int, state) -> float:
        t0 = time.perf_counter()
        if checkpointer is not None:
            with stopping.deferred():  # a signal waits until the checkpointer holds the step
                checkpointer.save(generation, state)
        return time.perf_counter() - t0

    if restored is None:
        t0 = time.perf_counter()
        population = jax.block_until_ready(initial())
        t_ops = time.perf_counter() - t0
        n0 = jax.tree_util.tree_leaves(population)[0].shape[0]
        scores = jnp.asarray(fitness(population, np.ones(n0, bool)), jnp.float32)
        evaluations += n0
        t0 = time.perf_counter()
        state = jax.block_until_ready(strategy.init(key, population, scores, params))
        t_ops += time.perf_counter() - t0
        metrics = {**_host_metrics(strategy.metrics(state)), "scored": n0}
        metrics["time_s"] = {"operators": t_ops, "checkpoint": save(0, state)}
        if on_generation is not None:
            on_generation(0, state, metrics)
        resumed_from = None
    else:
        state, resumed_from = restored.state, restored.step
        if on_resume is not None:
            on_resume(resumed_from, state)

    generation = int(state.generation)
    while generation < max_iter and not (patience > 0 and int(state.stall) >= patience):
        k_ask, k_tell = generation_keys(key, generation)
        t0 = time.perf_counter()
        children, state = strategy.ask(k_ask, state, params)
        need = np.asarray(strategy.needs_score(state))
        t_ops = time.perf_counter() - t0
        scores = np.full(need.shape, np.nan, np.float32)
        if need.any():
            scores[need] = np.asarray(fitness(children, need), np.float32)[need]
        evaluations += int(need.sum())
        t0 = time.perf_counter()
        state, metrics = strategy.tell(k_tell, state, children, jnp.asarray(scores), params)
        state = jax.block_until_ready(state)
        t_ops += time.perf_counter() - t0
        generation = int(state.generation)
        metrics = {**_host_metrics(metrics), "scored": int(need.sum())}
        metrics["time_s"] = {"operators": t_ops, "checkpoint": save(generation, state)}
        if on_generation is not None:
            on_generation(generation, state, metrics)
    return Evolution(state=state, generation=generation, resumed_from=resumed_from,
                     stopped_early=generation < max_iter, evaluations=evaluations)
