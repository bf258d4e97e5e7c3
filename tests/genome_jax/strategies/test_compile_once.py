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


@pytest.mark.parametrize("space,method", [("delta", "ties"), ("factors", "dare_ties")])
def test_module_programs_equal_the_whole_tree_operators(space, method):
    """make_offspring, module by module, equals the whole-tree operators run per module with that module's keys:
    crossover of module m with fold_in(k_cross, m) (factor and delta space), then the mutation's picks shared by all
    modules and its genes drawn from fold_in(gene_key_i, m)."""
    from genome_jax.operators import merge, mutation
    from genome_jax.strategies.common import make_offspring, offspring_plan, tree_where

    cfg = merge.MergeConfig(method=method, space=space, density=0.5, svd="exact")
    params = StrategyParams(population_size=6, cross=cfg, cross_rate=0.7, individual_mutation_rate=0.5,
                            gene_mutation_rate=0.3, sigma=0.05)
    pop = _population(7, 2, 6)
    fit = np.linspace(0.0, 1.0, 6).astype(np.float32)
    key = jax.random.PRNGKey(11)
    children, parents, changed = make_offspring(key, pop, fit, 5, params, 0)
    plan = offspring_plan(key, fit, 5, params, 0)
    np.testing.assert_array_equal(np.asarray(parents), np.asarray(plan["parents"]))
    any_mutated = np.zeros(5, bool)
    for mi, path in enumerate(sorted(pop)):
        merged = merge.crossover(jax.random.fold_in(plan["k_cross"], mi), {path: pop[path]}, plan["parents"],
                                 plan["weights"], config=cfg)[path]
        copies = jax.tree_util.tree_map(lambda a: a[np.asarray(plan["parents"][:, 0])], pop[path])
        want = tree_where(plan["crossed"], merged, copies)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, mi))(plan["gene_keys"][:, 0])
        want, mutated = jax.jit(lambda k, p, t, s: mutation.gaussian_mutation_picked(k, p, t, gene_rate=0.3, sigma=s))(
            keys, plan["picked"], want, plan["sigma"])
        any_mutated |= np.asarray(mutated)
        for name in ("A", "B"):
            np.testing.assert_allclose(np.asarray(children[path][name]), np.asarray(want[name]), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{path}.{name}")
    np.testing.assert_array_equal(np.asarray(changed), np.asarray(plan["crossed"]) | any_mutated)
    assert np.asarray(plan["crossed"]).any() and any_mutated.any()  # both operators took part


def test_split_mutation_equals_the_whole_population_operators():
    """Given the whole tree and the picks / gene keys drawn from the same key, the split-out mutations are the
    shipped whole-population operators, bit for bit."""
    from genome_jax.operators import mutation

    pop, key = _population(3, 2, 6), jax.random.PRNGKey(5)
    for whole_fn, part_fn, g in ((mutation.gaussian_mutation, mutation.gaussian_mutation_picked, 1),
                                 (mutation.svd_mutation, mutation.svd_mutation_picked, 2)):
        whole, m_whole = jax.jit(lambda k, t: whole_fn(k, t, individual_rate=0.5, gene_rate=0.3, sigma=0.05))(key, pop)
        picked, gk = mutation.pick_individuals(key, 6, 0.5, g)
        part, m_part = jax.jit(lambda k, p, t: part_fn(k, p, t, gene_rate=0.3, sigma=np.float32(0.05)))(
            gk[:, 0] if g == 1 else gk, picked, pop)
        assert np.asarray(m_whole).any() and not np.asarray(m_whole).all()
        np.testing.assert_array_equal(np.asarray(m_whole), np.asarray(m_part))
        for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(part)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
