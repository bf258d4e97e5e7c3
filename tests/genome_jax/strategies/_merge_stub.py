"""TEMPORARY, tests only: a trivial linear merge standing in for genome_jax.operators.merge until that module lands.

`ensure_merge()` installs it only when the real module cannot be imported; the real one always wins.
"""
from __future__ import annotations

import dataclasses
import sys
import types


def ensure_merge() -> bool:
    """Returns True when the stub had to be installed."""
    try:
        import genome_jax.operators.merge  # noqa: F401

        return False
    except ImportError:
        pass
    import jax
    import jax.numpy as jnp

    @dataclasses.dataclass(frozen=True)
    class MergeConfig:
        method: str = "linear"
        density: float = 1.0
        space: str = "factors"

    def crossover(key, factors, parent_idx, weights, *, config):
        def leaf(a):
            w = weights.reshape(weights.shape + (1,) * (a.ndim - 1)).astype(a.dtype)
            return jnp.sum(a[parent_idx] * w, axis=1)  # (C, K, ...) -> (C, ...)

        return jax.tree_util.tree_map(leaf, factors)

    mod = types.ModuleType("genome_jax.operators.merge")
    mod.MergeConfig, mod.crossover = MergeConfig, crossover
    sys.modules["genome_jax.operators.merge"] = mod
    import genome_jax.operators

    genome_jax.operators.merge = mod
    return True


