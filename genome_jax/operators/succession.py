"""Succession (GENOME+): a particle-swarm step that moves every individual through weight space.

Each individual i is a particle with position x_i (its factors), velocity v_i and personal best p_i; the swarm
shares a global best g and a global worst w. One step (as in Model Swarms, Feng et al. 2024):

    v_i' = r_v * inertia * v_i + r_p * cognitive * (p_i - x_i) + r_g * social * (g - x_i) - r_w * repel * (w - x_i)
    x_i' = x_i + lambda_t * v_i'

with r_v, r_p, r_g, r_w ~ U(0, 1) redrawn per particle per step, and lambda_t the step size at generation t
(a float or an optax schedule, e.g. `optax.exponential_decay(1.0, 1, 0.95)` for a decaying step).
The update is applied to the A and B factors separately (factor space, like GENOME's crossover).
Personal bests are tracked per particle by `update_personal_best`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from genome_jax.operators.mutation import resolve_schedule

__all__ = ["SuccessionConfig", "succession", "succession_coefficients", "succession_move", "update_personal_best"]


@dataclasses.dataclass(frozen=True)
class SuccessionConfig:
    """PSO coefficients (static). step_size: float or optax schedule of the generation count."""

    inertia: float = 0.4
    cognitive: float = 0.3
    social: float = 0.5
    repel: float = 0.1
    step_size: Union[float, Callable[[Any], Any]] = 1.0


def succession_coefficients(key, n: int) -> jax.Array:
    """The random coefficients (4, n) = (r_v, r_p, r_g, r_w) ~ U(0, 1) that `succession` draws from `key`."""
    return jax.random.uniform(key, (4, n), jnp.float32)


def succession(key, x, v, pbest, gbest, gworst, *, step=0, config: SuccessionConfig = SuccessionConfig()):
    """One swarm step.

    x, v, pbest: pytrees with leaves (P, ...) (positions, velocities, personal bests);
    gbest, gworst: the same pytree for one individual (leaves without the P axis). Returns (x', v').
    """
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    return succession_move(succession_coefficients(key, n), resolve_schedule(config.step_size, step), x, v, pbest,
                           gbest, gworst, config=config)


def succession_move(r, lam, x, v, pbest, gbest, gworst, *, config: SuccessionConfig = SuccessionConfig()):
    """`succession` with its coefficients drawn (r: (4, P) from `succession_coefficients`) and the step size
    resolved (lam: a scalar): the same step for any part of the pytrees (e.g. one module at a time)."""
    n = r.shape[1]
    lam = jnp.asarray(lam, jnp.float32)

    def move(xl, vl, pl, gl, wl):
        col = lambda c: c.reshape((n,) + (1,) * (xl.ndim - 1)).astype(xl.dtype)
        vn = (
            col(r[0] * config.inertia) * vl
            + col(r[1] * config.cognitive) * (pl - xl)
            + col(r[2] * config.social) * (gl[None] - xl)
            - col(r[3] * config.repel) * (wl[None] - xl)
        )
        return xl + lam.astype(xl.dtype) * vn, vn

    pairs = jax.tree_util.tree_map(move, x, v, pbest, gbest, gworst)
    is_pair = lambda t: isinstance(t, tuple)
    x_new = jax.tree_util.tree_map(lambda t: t[0], pairs, is_leaf=is_pair)
    v_new = jax.tree_util.tree_map(lambda t: t[1], pairs, is_leaf=is_pair)
    return x_new, v_new


def update_personal_best(pbest, pbest_fitness, x, fitness):
    """Keep, per particle, the better of its personal best and its new position.

    pbest, x: pytrees (P, ...); pbest_fitness, fitness: (P,). NaN is never better than anything, and anything
    finite beats a NaN personal best. Returns (pbest', pbest_fitness').
    """
    better = jnp.isfinite(fitness) & ((fitness > pbest_fitness) | ~jnp.isfinite(pbest_fitness))
    sel = lambda a, b: jnp.where(better.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return jax.tree_util.tree_map(sel, x, pbest), jnp.where(better, fitness, pbest_fitness)
