"""Compile once: a generation is a small plan plus one program per module shape, so a deeper model (more layers
of the same shapes) adds no XLA compile. One program over the whole population pytree took about a minute to
compile for SmolLM2's 30 layers (issue 14); this test fails if the compile work grows with the layers again."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from genome_jax.strategies import StrategyParams, get_strategy

# Fires once per XLA executable built (a compile, or a load from the persistent cache).
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
# Shapes no other test uses, so the first population compiles afresh (r = 3; two module kinds per layer).
SHAPES = {"self_attn.q_proj": ((3, 20), (20, 3)), "mlp.up_proj": ((3, 20), (44, 3))}


def _population(seed: int, layers: int, P: int) -> dict:
    rng = np.random.default_rng(seed)
    return {f"model.layers.{l}.{m}": {"A": rng.normal(0, 0.2, (P, *a)).astype(np.float32),
                                      "B": rng.normal(0, 0.2, (P, *b)).astype(np.float32)}
            for l in range(layers) for m, (a, b) in SHAPES.items()}


@pytest.mark.parametrize("method,mutation", [("genome", "gaussian"), ("genome_plus", "svd")])
def test_more_layers_compile_no_new_program(method, mutation):
    strat = get_strategy(method)
    params = StrategyParams(population_size=4, mutation=mutation, individual_mutation_rate=1.0,
                            gene_mutation_rate=0.5, max_generations=3)  # TIES crossover, roulette, elites
    fitness = np.linspace(0.1, 0.9, 4).astype(np.float32)
    C = strat.num_children(params)
    scores = np.linspace(1.0, 2.0, C).astype(np.float32)
    states = {n: strat.init(jax.random.PRNGKey(n), _population(n, n, 4), fitness, params) for n in (2, 6)}
    compiled: list[str] = []

    def listen(event, duration, **kw):
        if event == BACKEND_COMPILE:
            compiled.append(kw.get("fun_name", "?"))

    def generation(state):
        children, asked = strat.ask(strat.generation_key(state), state, params)
        told = jax.block_until_ready(strat.tell(asked, children, scores, params))
        return children, told

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        ch2, _ = generation(states[2])
        first = list(compiled)
        ch6, told6 = generation(states[6])
        more = compiled[len(first):]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first, "the 2-layer generation compiled nothing: the listener sees no compiles"
    assert not more, f"6 layers compiled {len(more)} more programs than 2 layers: {more}"
    # the programs ran: children of every module, and a generation was told
    assert set(ch6) == set(states[6].population) and int(told6.generation) == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(ch6))
