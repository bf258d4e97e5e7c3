"""Compile once: a generation is a small plan plus one program per module shape, so a deeper model (more layers
of the same shapes) adds no XLA compile. One program over the whole population pytree took about a minute to
compile for SmolLM2's 30 layers (issue 14); this test fails if the compile work grows with the layers again.
And the hyperparameters that are plain numbers (Params) are traced arguments: a new value compiles nothing."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from genome_jax.evolve import generation_keys
from genome_jax.strategies import make_strategy

# Fires once per XLA executable built (a compile, or a load from the persistent cache).
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
# Shapes no other test uses, so the first population compiles afresh (r = 3; two module kinds per layer).
SHAPES = {"self_attn.q_proj": ((3, 20), (20, 3)), "mlp.up_proj": ((3, 20), (44, 3))}


def _population(seed: int, layers: int, P: int) -> dict:
    rng = np.random.default_rng(seed)
    return {f"model.layers.{l}.{m}": {"A": rng.normal(0, 0.2, (P, *a)).astype(np.float32),
                                      "B": rng.normal(0, 0.2, (P, *b)).astype(np.float32)}
            for l in range(layers) for m, (a, b) in SHAPES.items()}


class _Compiles:
    """The XLA executables built inside the block (names of the jitted functions)."""

    def __enter__(self):
        self.names: list[str] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kw):
        if event == BACKEND_COMPILE:
            self.names.append(kw.get("fun_name", "?"))

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _generation(strat, state, params, scores, g=0):
    k_ask, k_tell = generation_keys(jax.random.PRNGKey(1), g)
    children, asked = strat.ask(k_ask, state, params)
    told, metrics = strat.tell(k_tell, asked, children, scores, params)
    return children, jax.block_until_ready(told)


@pytest.mark.parametrize("method,mutation", [("genome", "gaussian"), ("genome_plus", "svd")])
def test_more_layers_compile_no_new_program(method, mutation):
    strat, params = make_strategy(method, population_size=4, mutation=mutation, individual_mutation_rate=1.0,
                                  gene_mutation_rate=0.5)  # TIES crossover, roulette, elites
    fitness = np.linspace(0.1, 0.9, 4).astype(np.float32)
    scores = np.linspace(1.0, 2.0, strat.num_children).astype(np.float32)
    states = {n: strat.init(jax.random.PRNGKey(n), _population(n, n, 4), fitness, params) for n in (2, 6)}
    with _Compiles() as first:
        _generation(strat, states[2], params, scores)
    with _Compiles() as more:
        ch6, told6 = _generation(strat, states[6], params, scores)
    assert first.names, "the 2-layer generation compiled nothing: the listener sees no compiles"
    assert not more.names, f"6 layers compiled {len(more.names)} more programs than 2 layers: {more.names}"
    # the programs ran: children of every module, and a generation was told
    assert set(ch6) == set(states[6].population) and int(told6.generation) == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(ch6))


@pytest.mark.parametrize("method,mutation", [("genome", "gaussian"), ("genome_plus", "svd")])
def test_new_params_values_compile_nothing(method, mutation):
    """Every number of Params changed (and one set as a plain Python float): the second generation reuses every
    program of the first, and the new values do act (different children)."""
    strat, params = make_strategy(method, population_size=4, mutation=mutation, selection="rank")
    new = dict(cross_rate=0.3, individual_mutation_rate=1.0, gene_mutation_rate=0.9, sigma_decay=0.9,
               truncation_percent=0.2, rank_pressure=1.9, inertia=0.1, cognitive=0.9, social=0.2, repel=0.3,
               step_size=0.5, step_size_decay=0.7)
    other = params.replace(**{k: np.float32(v) for k, v in new.items() if k in params.to_dict()}).replace(sigma=0.3)
    assert all(other.to_dict()[k] != v for k, v in params.to_dict().items())
    fitness = np.linspace(0.1, 0.9, 4).astype(np.float32)
    scores = np.linspace(1.0, 2.0, strat.num_children).astype(np.float32)
    state = strat.init(jax.random.PRNGKey(0), _population(5, 2, 4), fitness, params)
    with _Compiles() as first:
        ch_a, _ = _generation(strat, state, params, scores)
    with _Compiles() as second:
        ch_b, _ = _generation(strat, state, other, scores)
    assert first.names, "the first generation compiled nothing: the listener sees no compiles"
    assert not second.names, f"new Params values compiled {len(second.names)} programs: {second.names}"
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ch_a),
                                                          jax.tree_util.tree_leaves(ch_b)))
    # a structural setting is the strategy's, not Params': it makes other programs (the counter can see that)
    strat2, _ = make_strategy(method, population_size=4, mutation=mutation, selection="rank", tournament_size=2,
                              n_parents=3)
    state2 = strat2.init(jax.random.PRNGKey(0), _population(5, 2, 4), fitness, params)
    with _Compiles() as third:
        _generation(strat2, state2, params, scores)
    assert third.names


@pytest.mark.parametrize("space,method", [("delta", "ties"), ("factors", "dare_ties")])
def test_module_programs_equal_the_whole_tree_operators(space, method):
    """make_offspring, module by module, equals the whole-tree operators run per module with that module's keys:
    crossover of module m with fold_in(k_cross, m) (factor and delta space), then the mutation's picks shared by all
    modules and its genes drawn from fold_in(gene_key_i, m)."""
    from genome_jax.operators import merge, mutation
    from genome_jax.strategies.common import make_offspring, offspring_plan, tree_where

    cfg = merge.MergeConfig(method=method, space=space, density=0.5, svd="exact")
    strategy, params = make_strategy("genome", population_size=6, cross=cfg, cross_rate=0.7,
                                     individual_mutation_rate=0.5, gene_mutation_rate=0.3, sigma=0.05)
    pop = _population(7, 2, 6)
    fit = np.linspace(0.0, 1.0, 6).astype(np.float32)
    key = jax.random.PRNGKey(11)
    children, parents, changed = make_offspring(key, pop, fit, 5, strategy, params, 0)
    plan = offspring_plan(key, fit, 5, strategy, params, 0)
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
