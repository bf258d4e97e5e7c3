"""`genome bench operators`: one generation (select + crossover + mutate) on SmolLM2-135M-shaped LoRA populations.

In the same run: the PEFT-style baseline (a Python loop over children calling `peft.utils.merge_utils.ties` per
tensor, in torch), and a memory-bandwidth probe (a large jnp copy). Prints medians after a warm-up call.

Population: 30 layers x {q,k,v,o,gate,up,down}_proj at rank 16 (hidden 576, intermediate 1536, 9 heads x 64,
3 kv heads x 64), float32: 4.88 M parameters (19.5 MB) per individual. Larger P keep the same per-layer shapes but
fewer layers so population + children fit `--mem-budget-gb`; figures are reported per 30-layer child.

Effective bytes (what an ideal one-pass implementation must move): crossover = cuts read every parent once (P S)
+ each child reads its K parents and writes itself ((K + 1) C S); the generation adds mutation's read + write of
the children (2 C S); S = bytes per individual.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

ROW = "{:>6} {:>6} {:>12} {:>12} {:>12} {:>10} {:>9} {:>10}"

SHAPES = {  # module -> (A (r, d_in), B (d_out, r)) at r = 16
    "self_attn.q_proj": ((16, 576), (576, 16)),
    "self_attn.k_proj": ((16, 576), (192, 16)),
    "self_attn.v_proj": ((16, 576), (192, 16)),
    "self_attn.o_proj": ((16, 576), (576, 16)),
    "mlp.gate_proj": ((16, 576), (1536, 16)),
    "mlp.up_proj": ((16, 576), (1536, 16)),
    "mlp.down_proj": ((16, 1536), (576, 16)),
}
LAYER_PARAMS = sum(a[0] * a[1] + b[0] * b[1] for a, b in SHAPES.values())  # 162,816


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--population", type=int, default=64, help="P (= children per generation); default 64")
    parser.add_argument("--scaling", type=int, nargs="*", default=[256, 1024],
                        help="more population sizes to show how cost grows (default 256 1024; none: skip)")
    parser.add_argument("--method", default="ties", help="merge method (default ties)")
    parser.add_argument("--space", choices=("factors", "delta"), default="factors")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--parents", type=int, default=2, help="K parents per child (default 2)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (median reported)")
    parser.add_argument("--baseline-children", type=int, default=3,
                        help="children the PEFT loop merges (its time is extrapolated to P); 0 skips the baseline")
    parser.add_argument("--baseline-threads", type=int, default=1,
                        help="torch threads for the baseline (1 is its fastest setting on the shared 2-core box)")
    parser.add_argument("--mem-budget-gb", type=float, default=3.0,
                        help="population + children bytes allowed for the --scaling sizes (layers shrink to fit)")
    parser.add_argument("--probe-mb", type=int, default=512, help="size of the bandwidth probe's array")
    parser.add_argument("--seed", type=int, default=0)


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of `repeats` later calls), seconds; fn must block."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts)


def bandwidth_probe(mb: int, repeats: int) -> dict:
    """GB/s of a large elementwise copy (read + write counted), in place (donated) and into a fresh buffer."""
    import jax
    import jax.numpy as jnp

    n = mb * (1 << 20) // 4
    x = jnp.zeros((n,), jnp.float32)
    fresh = jax.jit(lambda a: a + 1.0)
    inplace = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    _, t_fresh = _median_time(lambda: fresh(x).block_until_ready(), repeats)
    box = [x]

    def step():
        box[0] = inplace(box[0])
        box[0].block_until_ready()

    _, t_in = _median_time(step, repeats)
    nbytes = 2 * n * 4
    return {"inplace_gbs": nbytes / t_in / 1e9, "fresh_gbs": nbytes / t_fresh / 1e9}


def make_population(key, P: int, layers: int):
    import jax
    import jax.numpy as jnp

    factors = {}
    for layer in range(layers):
        for mod, (sa, sb) in SHAPES.items():
            key, ka, kb = jax.random.split(key, 3)
            path = f"model.layers.{layer}.{mod}"
            factors[path] = {"A": jax.random.normal(ka, (P, *sa), jnp.float32) / sa[1] ** 0.5,
                             "B": 0.02 * jax.random.normal(kb, (P, *sb), jnp.float32)}
    return factors


def _own_mutation(key, factors, *, individual_rate, gene_rate, sigma):
    """Fallback when genome_jax.operators.mutation is missing: Gaussian noise under a Bernoulli gene mask."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten(factors)
    P = leaves[0].shape[0]
    k_ind, key = jax.random.split(key)
    picked = jax.random.bernoulli(k_ind, individual_rate, (P,))
    out = []
    for i, x in enumerate(leaves):
        k_m, k_n = jax.random.split(jax.random.fold_in(key, i))
        m = jax.random.bernoulli(k_m, gene_rate, x.shape) & picked.reshape((P,) + (1,) * (x.ndim - 1))
        out.append(jnp.where(m, x + sigma * jax.random.normal(k_n, x.shape, x.dtype), x))
    return treedef.unflatten(out), picked


def make_generation(config, P: int, K: int):
    """jit(select -> crossover -> mutate) for P children; returns (fn, description of the operators used)."""
    import jax
    import jax.numpy as jnp

    from genome_jax.operators import merge

    try:
        from genome_jax.operators import mutation, selection

        select = lambda k, f: selection.select_parents(k, f, P * K, method="roulette").reshape(P, K)
        mutate = lambda k, x: mutation.gaussian_mutation(k, x, individual_rate=0.15, gene_rate=0.01, sigma=0.01)[0]
        used = "selection.select_parents(roulette) + merge.crossover + mutation.gaussian_mutation"
    except ImportError:  # the other helpers' operators are not there: minimal stand-ins (said in the output)
        select = lambda k, f: jax.random.categorical(k, jax.nn.log_softmax(f), shape=(P, K)).astype(jnp.int32)
        mutate = lambda k, x: _own_mutation(k, x, individual_rate=0.15, gene_rate=0.01, sigma=0.01)[0]
        used = "own roulette + merge.crossover + own Gaussian mutation (operators.mutation/selection missing)"

    @jax.jit
    def generation(key, factors, fitness):
        k_sel, k_w, k_x, k_mut = jax.random.split(key, 4)
        parents = select(k_sel, fitness)
        w = jax.random.uniform(k_w, (P, K), jnp.float32, 0.05, 1.0)
        w = w / jnp.sum(w, axis=1, keepdims=True)
        children = merge.crossover(k_x, factors, parents, w, config=config)
        return mutate(k_mut, children)

    return generation, used


def peft_baseline(factors_np: dict, n_children: int, density: float, K: int, seed: int, threads: int) -> float:
    """Median seconds per child of the PEFT-style loop: per child, per tensor, merge_utils.ties in torch."""
    import numpy as np
    import torch
    from peft.utils.merge_utils import ties as peft_ties

    torch.set_num_threads(threads)
    tensors = {k: torch.from_numpy(v) for k, v in factors_np.items()}
    P = next(iter(tensors.values())).shape[0]
    rng = np.random.default_rng(seed)
    times = []
    with torch.no_grad():
        for c in range(n_children + 1):  # the first child warms torch up and is not counted
            idx = rng.choice(P, size=K, replace=False)
            w = torch.tensor(rng.dirichlet(np.ones(K)), dtype=torch.float32)
            t0 = time.perf_counter()
            child = {name: peft_ties([t[i] for i in idx], w, density) for name, t in tensors.items()}
            dt = time.perf_counter() - t0
            assert len(child) == len(tensors)
            if c:
                times.append(dt)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from genome_jax.errors import UserError
    from genome_jax.operators import merge

    if args.population < 2 or args.parents < 1 or args.layers < 1 or args.repeats < 1:
        raise UserError("--population must be >= 2 and --parents, --layers, --repeats >= 1")
    config = merge.MergeConfig(method=args.method, density=args.density, space=args.space)
    K = args.parents
    print(f"genome bench operators: method={args.method} space={args.space} density={args.density} K={K} "
          f"backend={jax.default_backend()} devices={jax.device_count()}", flush=True)
    if args.method == "ties":
        from kernels import threshold

        print(f"  threshold select: {threshold.resolve_impl(config.select)}; TIES kernel: "
              f"{'pallas' if jax.default_backend() == 'gpu' else 'fused jnp (XLA)'}")

    bw = bandwidth_probe(args.probe_mb, max(3, args.repeats))
    print(f"  bandwidth probe ({args.probe_mb} MB jnp copy, read + write): in place {bw['inplace_gbs']:.2f} GB/s, "
          f"into a fresh buffer {bw['fresh_gbs']:.2f} GB/s (page faults included)", flush=True)
    ref_bw = bw["inplace_gbs"]

    sizes = [args.population] + [p for p in (args.scaling or []) if p != args.population]
    results = []
    baseline_child_s = None
    for si, P in enumerate(sizes):
        layers = args.layers
        if si:
            per_layer = 2 * P * LAYER_PARAMS * 4  # population + children
            layers = max(1, min(args.layers, int(args.mem_budget_gb * 1e9 // per_layer)))
        key = jax.random.key(args.seed + si)
        factors = make_population(key, P, layers)
        fitness = jax.random.uniform(jax.random.fold_in(key, 1), (P,))
        S = layers * LAYER_PARAMS * 4  # bytes per individual
        gen, used = make_generation(config, P, K)
        row = {"P": P, "layers": layers}
        if si == 0:
            idx = jax.random.randint(jax.random.fold_in(key, 2), (P, K), 0, P)
            w = jax.random.dirichlet(jax.random.fold_in(key, 3), np.ones(K), (P,))
            cross = lambda: jax.block_until_ready(merge.crossover(key, factors, idx, w, config=config))
            row["cross_compile"], row["cross_s"] = _median_time(cross, args.repeats)
            print(f"  P={P}: crossover alone: first call {row['cross_compile']:.1f} s (compile), "
                  f"median {row['cross_s']:.3f} s", flush=True)
        first, row["gen_s"] = _median_time(lambda: jax.block_until_ready(gen(key, factors, fitness)), args.repeats)
        print(f"  P={P} ({layers} layers): generation [{used}]: first call {first:.1f} s, median {row['gen_s']:.3f} s",
              flush=True)
        row["cross_bytes"] = (P + (K + 1) * P) * S
        row["gen_bytes"] = row["cross_bytes"] + 2 * P * S
        row["scale30"] = layers / args.layers
        if si == 0 and args.baseline_children > 0 and args.method == "ties" and args.space == "factors":
            host = {f"{p}.{ab}": np.array(v[ab]) for p, v in factors.items() for ab in ("A", "B")}
            baseline_child_s = peft_baseline(host, args.baseline_children, args.density, K, args.seed,
                                             args.baseline_threads) / row["scale30"]
            print(f"  PEFT loop (merge_utils.ties per tensor, torch {args.baseline_threads} thread(s)): "
                  f"{baseline_child_s:.3f} s per child (median of {args.baseline_children}; "
                  f"P children extrapolated)", flush=True)
        results.append(row)
        del factors

    print()
    print("| P | layers | crossover s | generation s | children/s (gen; per --layers child) | eff. GB/s (cross / gen) | "
          "of probe BW (cross / gen) | speedup vs PEFT loop (cross / gen) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        P = row["P"]
        cross = row.get("cross_s")
        cps = P / row["gen_s"] * row["scale30"]
        gbs_gen = row["gen_bytes"] / row["gen_s"] / 1e9
        gbs_cross = row["cross_bytes"] / cross / 1e9 if cross else None
        base = baseline_child_s * P * row["scale30"] if baseline_child_s else None
        fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)
        print(f"| {P} | {row['layers']} | {fmt(cross)} | {row['gen_s']:.3f} | {cps:.1f} | "
              f"{fmt(gbs_cross, '{:.2f}')} / {gbs_gen:.2f} | "
              f"{fmt(gbs_cross and gbs_cross / ref_bw, '{:.0%}')} / {gbs_gen / ref_bw:.0%} | "
              f"{fmt(base and cross and base / cross, '{:.1f}x')} / {fmt(base and base / row['gen_s'], '{:.1f}x')} |")
    if baseline_child_s:
        print(f"\nPEFT loop: {baseline_child_s:.3f} s per child, measured on {args.baseline_children} children and "
              f"extrapolated linearly to each P (its cost per child does not depend on P).")
    print(f"Probe bandwidth (in place): {ref_bw:.2f} GB/s. Command: genome bench operators "
          f"{' '.join(sys.argv[3:]) if sys.argv[1:2] == ['bench'] else ''}".rstrip())
    return 0
