"""Search strategies with an evosax-like ask/tell surface over flax.struct state.

    strategy = get_strategy("genome" | "genome_plus")
    state = strategy.init(key, population_factors, fitness, params)
    children, state = strategy.ask(strategy.generation_key(state), state, params)
    state = strategy.tell(state, children, fitness, params)     # score only needs_score(state)

`ask` and `tell` are each a small jitted plan (per-individual decisions) plus one jitted program per module, run
once per module with the module's index traced (params is static): XLA compiles one program per distinct module
shape, so compile time does not grow with the number of layers. Both are traceable (a caller may jit them whole).
"""
from __future__ import annotations

from types import ModuleType

from genome_jax.errors import UserError
from genome_jax.strategies import genome, genome_plus
from genome_jax.strategies.common import StrategyParams, initial_population, needs_score

STRATEGIES: dict[str, ModuleType] = {"genome": genome, "genome_plus": genome_plus}

__all__ = ["STRATEGIES", "StrategyParams", "get_strategy", "initial_population", "needs_score", "genome", "genome_plus"]


def get_strategy(name: str) -> ModuleType:
    """The strategy module (init, ask, tell, done, generation_key, num_children) for a method name."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UserError(f"unknown method '{name}' (known: {', '.join(STRATEGIES)})") from None
