"""Shard the population axis over every device of the job (all local devices; all hosts after jax.distributed).

Sharding never changes what is computed, only where. A strategy state declares which of its fields carry the
population axis (`POPULATION_FIELDS`: the individuals' factors, velocities, personal bests); their leaves are split
over a 1-D mesh axis named "pop", as are the children of `ask` and the initial population given to `init`. Every
other leaf (fitness and other P-vectors, scalars, the best individual, params, metrics) is replicated. Operators
stay sharding-agnostic: they run under `jax.jit` with these in/out shardings and XLA inserts the collectives, e.g.
the all-gather that brings a parent living on another device to the child that needs it.

    mesh = population_mesh()                                 # all devices, 1-D axis "pop"
    strategy = ShardedStrategy(strategy, mesh)               # init / ask / tell with the population split
    target = strategy.state_template(population, params)     # an orbax restore target carrying the shardings

Multi-host: call `initialize_distributed()` first in every process (same program, SPMD); the mesh then spans every
host's devices, and `to_host` gathers a sharded result on each process.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from genome_jax.errors import UserError

POP_AXIS = "pop"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Join a multi-host job with `jax.distributed.initialize`; returns True when this process is part of one.

    Arguments default to JAX's own env vars (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and to
    its cluster auto-detection (SLURM, Open MPI, TPU pods, Kubernetes). With none of those set this is a no-op, so
    single-host code can call it unconditionally. Must run before anything touches a device.
    """
    explicit = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"))
    if not explicit and not cluster and num_processes is None:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return jax.process_count() > 1


def population_mesh(devices: Sequence[jax.Device] | None = None, n_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis "pop" over `devices` (default: all devices of all processes), optionally the first
    `n_devices` of them. Axis type Auto: operators written without sharding in mind are partitioned by XLA."""
    devs = list(jax.devices() if devices is None else devices)
    if n_devices is not None:
        if not 1 <= n_devices <= len(devs):
            raise UserError(f"n_devices {n_devices}: this job has {len(devs)} device(s)")
        devs = devs[:n_devices]
    return Mesh(np.asarray(devs, dtype=object), (POP_AXIS,), axis_types=(AxisType.Auto,))


def population_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over "pop", the rest whole: individual i lives on device i // (P / n_devices)."""
    return NamedSharding(mesh, PartitionSpec(POP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(pop_sizes: Iterable[int], mesh: Mesh) -> None:
    """Raise UserError unless every population size splits evenly over the mesh (XLA needs equal shards)."""
    n = mesh.devices.size
    bad = sorted(p for p in set(pop_sizes) if p % n)
    if bad:
        raise UserError(
            f"population size {bad[0]} does not split over {n} devices; use a multiple of {n} "
            f"(or fewer devices, e.g. {math.gcd(bad[0], n)})"
        )


def same_sharding(tree: Any, sharding: NamedSharding) -> Any:
    """`sharding` for every leaf of `tree`."""
    return jax.tree.map(lambda _: sharding, tree)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings matching a strategy state (arrays or ShapeDtypeStructs): the fields the state's class lists
    in POPULATION_FIELDS split over "pop", every other field replicated. Per-individual scalars (fitness, masks,
    sources: P numbers) stay whole on every device: splitting them saves nothing, and a sum over a split axis would
    add in another order than on one device (the run would no longer be bit-identical)."""
    split = set(type(state).POPULATION_FIELDS)
    return state.replace(**{
        f.name: same_sharding(getattr(state, f.name), population_sharding(mesh) if f.name in split
                              else replicated(mesh))
        for f in dataclasses.fields(state)})


def place(tree: Any, shardings: Any) -> Any:
    """Put a pytree (numpy or jax arrays) on the matching tree of shardings.

    Works in multi-process jobs too, provided every process holds the same global value (as after a seeded init):
    each process builds only its own shards from it. Device arrays are resharded on device.
    """
    return jax.tree.map(_place, tree, shardings)


def abstract_tree(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the `target` an orbax restore needs to land a checkpoint (saved on
    any device count) directly in this layout."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _place(x: Any, s: NamedSharding) -> jax.Array:
    """One leaf onto sharding s. Multi-process: a process-local value is taken as the global value (the same on
    every process), and each process builds only its own shards from it."""
    if isinstance(x, jax.Array):
        if x.sharding == s:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        if not x.is_fully_addressable:
            return _reshard(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])


@functools.lru_cache(maxsize=None)
def _resharder(sharding: NamedSharding) -> Callable:
    return jax.jit(lambda x: x, out_shardings=sharding)


def _reshard(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    return _resharder(sharding)(x)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf whole on every device of `mesh` (an all-gather of sharded leaves; works across processes).
    Use it where a computation must see whole individuals, e.g. a scorer batched over the population axis."""
    return jax.tree.map(lambda x: _reshard(x, replicated(mesh)), tree)


def to_host(tree: Any) -> Any:
    """Whole numpy values on this process: a plain device_get on one host, an all-gather across processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        if isinstance(x, jax.Array) and not x.is_fully_addressable
        else np.asarray(x),
        tree,
    )


class ShardedStrategy:
    """A strategy (`genome_jax.strategies.Strategy`) whose init / ask / tell run under jit with the population axis
    sharded over `mesh`: a drop-in for the strategy in `genome_jax.evolve.evolve` or any ask/tell loop.

        strategy = ShardedStrategy(Genome(population_size=8), population_mesh())
        state = strategy.init(key, population, fitness, params)            # sharded state
        children, state = strategy.ask(k_ask, state, params)
        state, metrics = strategy.tell(k_tell, state, children, fitness, params)

    Results are the same as the unsharded strategy's (the PRNG is partitionable; XLA only moves data): every
    population size of the strategy must split evenly over the mesh (UserError otherwise).
    """

    def __init__(self, strategy: Any, mesh: Mesh):
        check_divisible(strategy.population_sizes, mesh)
        self.strategy, self.mesh = strategy, mesh
        self._pop, self._rep = population_sharding(mesh), replicated(mesh)
        self._jitted: dict[tuple, Callable] = {}

    def _run(self, name: str, fn: Callable, in_sh: Callable, out_sh: Callable, *args):
        """fn(*args) under jit with in/out shardings derived from the arguments' and results' structure (one jit
        per distinct argument structure, as with jit); inputs are committed to their shardings first."""
        sig = (name, _signature(args))
        if sig not in self._jitted:
            ins = in_sh(*args)
            self._jitted[sig] = (jax.jit(fn, in_shardings=ins, out_shardings=out_sh(jax.eval_shape(fn, *args))), ins)
        jitted, ins = self._jitted[sig]
        return jitted(*place(args, ins))

    def _rep_tree(self, tree):
        return same_sharding(tree, self._rep)

    def _pop_tree(self, tree):
        return same_sharding(tree, self._pop)

    def init(self, key, population, fitness, params):
        return self._run("init", self.strategy.init,
                         lambda k, p, f, q: (self._rep_tree(k), self._pop_tree(p), self._rep_tree(f), self._rep_tree(q)),
                         self.shardings, key, population, jnp.asarray(fitness, jnp.float32), params)

    def ask(self, key, state, params):
        return self._run("ask", self.strategy.ask,
                         lambda k, s, q: (self._rep_tree(k), self.shardings(s), self._rep_tree(q)),
                         lambda out: (self._pop_tree(out[0]), self.shardings(out[1])), key, state, params)

    def tell(self, key, state, children, fitness, params):
        return self._run("tell", self.strategy.tell,
                         lambda k, s, c, f, q: (self._rep_tree(k), self.shardings(s), self._pop_tree(c),
                                                self._rep_tree(f), self._rep_tree(q)),
                         lambda out: (self.shardings(out[0]), self._rep_tree(out[1])),
                         key, state, children, jnp.asarray(fitness, jnp.float32), params)

    def shardings(self, state: Any) -> Any:
        """This layout's shardings for a state (see `state_shardings`)."""
        return state_shardings(state, self.mesh)

    def shard(self, state: Any) -> Any:
        """Place a state (e.g. one restored on the host) in this layout."""
        return place(state, self.shardings(state))

    def state_template(self, population, params):
        """The strategy's state template with this layout's shardings (an orbax restore target)."""
        template = self.strategy.state_template(population, params)
        return abstract_tree(template, self.shardings(template))

    def __getattr__(self, name: str) -> Any:  # needs_score, metrics, num_children, population_sizes, ...
        return getattr(self.strategy, name)


def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((getattr(x, "shape", ()), str(getattr(x, "dtype", type(x)))) for x in leaves)
