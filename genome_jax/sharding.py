"""Shard the population axis over every device of the job (all local devices; all hosts after jax.distributed).

Sharding never changes what is computed, only where: a per-individual array (ndim >= 2, leading axis a population
axis: size P for parents, or the number of children) is split over a 1-D mesh axis named "pop"; every other leaf
(fitness and other P-vectors, keys, scalars, the history) is replicated. Operators stay sharding-agnostic: they run under `jax.jit` with these
in/out shardings and XLA inserts the collectives, e.g. the all-gather that brings a parent living on another device
to the child that needs it.

    mesh = population_mesh()                               # all devices, 1-D axis "pop"
    state = shard_tree(state, mesh, pop_sizes=(P,))        # host or device pytree -> sharded pytree
    ask = shard_jit(strategy.ask, mesh, pop_sizes=(P,))    # jitted, population axis sharded in and out
    target = abstract_tree(state, population_mesh(devices[:2]), (P,))   # orbax restore onto another mesh

Multi-host: call `initialize_distributed()` first in every process (same program, SPMD); the mesh then spans every
host's devices, and `to_host` gathers a sharded result on each process.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
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


def _sizes(pop_sizes: int | Iterable[int]) -> frozenset[int]:
    return frozenset([pop_sizes] if isinstance(pop_sizes, int) else pop_sizes)


def check_divisible(pop_sizes: int | Iterable[int], mesh: Mesh) -> None:
    """Raise UserError unless every population size splits evenly over the mesh (XLA needs equal shards)."""
    n = mesh.devices.size
    bad = sorted(p for p in _sizes(pop_sizes) if p % n)
    if bad:
        raise UserError(
            f"population size {bad[0]} does not split over {n} devices; use a multiple of {n} "
            f"(or fewer devices, e.g. {math.gcd(bad[0], n)})"
        )


def leaf_sharding(leaf: Any, mesh: Mesh, pop_sizes: int | Iterable[int]) -> NamedSharding:
    """Population sharding for a per-individual array (a leaf with ndim >= 2 whose leading axis is a population
    axis: the LoRA factors, velocities, personal bests), else replicated. Per-individual scalars (fitness, masks,
    sources: P numbers) stay whole on every device: splitting them saves nothing, and a sum over a split axis
    would add in another order than on one device (the run would no longer be bit-identical)."""
    shape = getattr(leaf, "shape", ())
    if len(shape) >= 2 and shape[0] in _sizes(pop_sizes) and shape[0] % mesh.devices.size == 0:
        return population_sharding(mesh)
    return replicated(mesh)


def tree_shardings(tree: Any, mesh: Mesh, pop_sizes: int | Iterable[int]) -> Any:
    """A pytree of NamedShardings matching `tree` (arrays or ShapeDtypeStructs)."""
    sizes = _sizes(pop_sizes)
    return jax.tree.map(lambda x: leaf_sharding(x, mesh, sizes), tree)


def shard_tree(tree: Any, mesh: Mesh, pop_sizes: int | Iterable[int]) -> Any:
    """Place a pytree (numpy or jax arrays) on `mesh`: population leaves split over "pop", others replicated.

    Works in multi-process jobs too, provided every process holds the same global value (as after a seeded init):
    each process builds only its own shards from it. Device arrays are resharded on device.
    """
    check_divisible(pop_sizes, mesh)
    return jax.tree.map(_place, tree, tree_shardings(tree, mesh, pop_sizes))


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


def abstract_tree(tree: Any, mesh: Mesh, pop_sizes: int | Iterable[int]) -> Any:
    """ShapeDtypeStructs carrying the target shardings on `mesh`: the `target` an orbax restore needs to land a
    checkpoint (saved on any device count) directly in this layout."""
    shardings = tree_shardings(tree, mesh, pop_sizes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def to_host(tree: Any) -> Any:
    """Whole numpy values on this process: a plain device_get on one host, an all-gather across processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        if isinstance(x, jax.Array) and not x.is_fully_addressable
        else np.asarray(x),
        tree,
    )


def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((getattr(x, "shape", ()), str(getattr(x, "dtype", type(x)))) for x in leaves)


def shard_jit(
    fn: Callable,
    mesh: Mesh,
    pop_sizes: int | Iterable[int],
    *,
    donate_argnums: Sequence[int] = (),
) -> Callable:
    """`jax.jit(fn)` with population-axis in/out shardings on `mesh`, derived from the arguments' and results'
    shapes (via `jax.eval_shape`). All positional arguments must be pytrees of arrays; bind static configuration
    with functools.partial first. One compilation per distinct argument structure, as with jit.
    """
    sizes = _sizes(pop_sizes)
    check_divisible(sizes, mesh)
    compiled: dict[tuple, Callable] = {}

    @functools.wraps(fn)
    def wrapped(*args):
        sig = _signature(args)
        jitted = compiled.get(sig)
        if jitted is None:
            in_sh = tree_shardings(args, mesh, sizes)
            out_sh = tree_shardings(jax.eval_shape(fn, *args), mesh, sizes)
            jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=tuple(donate_argnums))
            compiled[sig] = (jitted, in_sh)
        else:
            jitted, in_sh = jitted
        args = jax.tree.map(_place, args, in_sh)  # commit every input to its sharding (no-op when it has it)
        return jitted(*args)

    wrapped.mesh = mesh  # type: ignore[attr-defined]
    return wrapped


def population_sizes(strategy: Any, params: Any) -> frozenset[int]:
    """The leading-axis sizes that count as population axes for a strategy: the population (or, for GENOME+, its
    slots), the initial population and the children of one generation."""
    sizes = {params.population_size, strategy.num_children(params)}
    if hasattr(strategy, "GenomePlusState"):
        sizes.add(params.capacity)
    return frozenset(sizes)


class ShardedStrategy:
    """A strategy module (`genome_jax.strategies.get_strategy(...)`) whose init/ask/tell run under jit with the
    population axis sharded over `mesh`. A drop-in for the module in a driver loop:

        strategy = ShardedStrategy(get_strategy("genome"), population_mesh(), params)
        state = strategy.init(key, population, fitness, params)          # sharded state
        children, state = strategy.ask(strategy.generation_key(state), state, params)
        state = strategy.tell(state, children, fitness, params)

    Results are the same as the unsharded module's (the PRNG is partitionable; XLA only moves data): every
    population size must split evenly over the mesh (UserError otherwise).
    """

    def __init__(self, strategy: Any, mesh: Mesh, params: Any):
        self.strategy, self.mesh, self.params = strategy, mesh, params
        self.pop_sizes = population_sizes(strategy, params)
        check_divisible(self.pop_sizes, mesh)
        self._init = shard_jit(functools.partial(strategy.init, params=params), mesh, self.pop_sizes)
        self._ask = shard_jit(functools.partial(strategy.ask, params=params), mesh, self.pop_sizes)
        self._tell = shard_jit(functools.partial(strategy.tell, params=params), mesh, self.pop_sizes)

    def _same(self, params: Any) -> None:
        if params is not self.params and params != self.params:
            raise ValueError("ShardedStrategy was built for other StrategyParams")

    def init(self, key, population, fitness, params):
        self._same(params)
        return self._init(key, population, fitness)

    def ask(self, key, state, params):
        self._same(params)
        return self._ask(key, state)

    def tell(self, state, children, fitness, params):
        self._same(params)
        return self._tell(state, children, fitness)

    def shard(self, tree: Any) -> Any:
        """Place any pytree (a restored state, a population) in this strategy's layout."""
        return shard_tree(tree, self.mesh, self.pop_sizes)

    def abstract(self, tree: Any) -> Any:
        """ShapeDtypeStructs with this layout's shardings (an orbax restore target)."""
        return abstract_tree(tree, self.mesh, self.pop_sizes)

    def __getattr__(self, name: str) -> Any:  # done, generation_key, num_children, the state class, ...
        return getattr(self.strategy, name)
