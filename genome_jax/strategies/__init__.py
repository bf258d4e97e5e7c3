"""Search strategies as evosax-style classes: structure in the constructor, numbers in a `Params` pytree.

    strategy, params = make_strategy("genome" | "genome_plus", population_size=8, sigma=0.02, ...)
    state = strategy.init(key, population, fitness, params)
    children, state = strategy.ask(key_ask, state, params)
    scores = ...                                       # for the children strategy.needs_score(state) marks
    state, metrics = strategy.tell(key_tell, state, children, scores, params)

`genome_jax.evolve.evolve` is the loop around them (keys, checkpoints, early stopping). `ask` and `tell` are each
a small jitted plan (per-individual decisions) plus one jitted program per module, run once per module with the
module's index traced (the strategy object is static, params traced): XLA compiles one program per distinct module
shape, so compile time does not grow with the number of layers, and a new params value compiles nothing.
"""
from __future__ import annotations

from typing import Any

from genome_jax import settings as settings_table
from genome_jax.errors import UserError
from genome_jax.operators.merge import MergeConfig
from genome_jax.run_config import RunConfig
from genome_jax.strategies.common import SETTINGS, Params, Strategy, initial_population, validate_settings
from genome_jax.strategies.genome import Genome, GenomeState
from genome_jax.strategies.genome_plus import GenomePlus, GenomePlusParams, GenomePlusState

STRATEGIES: dict[str, type[Strategy]] = {"genome": Genome, "genome_plus": GenomePlus}

__all__ = ["STRATEGIES", "strategy_settings", "strategy_params", "SETTINGS", "Strategy", "Params", "Genome", "GenomeState", "GenomePlus", "GenomePlusParams",
           "GenomePlusState", "get_strategy", "make_strategy", "initial_population"]


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class of a method name."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UserError(f"unknown method '{name}' (known: {', '.join(STRATEGIES)})") from None


def make_strategy(method: str, **settings: Any) -> tuple[Strategy, Params]:
    """(strategy, params) of `method` from settings named as in SETTINGS (each optional, with its default there).
    Raises UserError naming the first unknown or invalid setting."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise UserError(f"unknown strategy setting '{unknown[0]}' (known: {', '.join(SETTINGS)})")
    full = {**SETTINGS, **settings}
    validate_settings(full)
    return get_strategy(method).from_settings(full)


# ---- the strategy of a run config (kept out of run_config: reading and checking a config never imports JAX)
def strategy_settings(cfg: RunConfig) -> dict[str, Any]:
    """{strategy parameter name: value} of the settings the table sends to the strategy (`to="strategy"`): the
    keywords of `make_strategy` (max_iter and early_stop_iter are the loop's). A merge's sub-settings
    ("cross.density") make that merge a MergeConfig; at MergeConfig's defaults the method name stays (the
    strategy reads a name as the same MergeConfig)."""
    out: dict[str, Any] = {}
    merge_subs: dict[str, dict[str, Any]] = {}
    for s in settings_table.SETTINGS:
        if s.to != "strategy":
            continue
        value = getattr(cfg, s.name)
        merge, _, field = s.target.partition(".")
        if field:
            merge_subs.setdefault(merge, {})[field] = value
        else:
            out[s.target] = value
    for merge, subs in merge_subs.items():
        if any(v != getattr(MergeConfig, f) for f, v in subs.items()):
            # mergekit's normalisation by the agreeing weights, as the strategy gives a method name
            out[merge] = MergeConfig(method=out[merge], normalize="weight", **subs)
    return out


def strategy_params(cfg: RunConfig) -> tuple[Strategy, Params]:
    """(strategy, params) of the configured method: `make_strategy(cfg.method, **strategy_settings(cfg))` (validated
    there too); max_iter and early_stop_iter go to the loop (genome_jax.evolve)."""
    return make_strategy(cfg.method, **strategy_settings(cfg))
