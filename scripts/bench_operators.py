"""`genome bench operators`: one generation (select + crossover + mutate) on SmolLM2-135M-shaped LoRA populations.

In the same run: the PEFT-style baseline (a Python loop over children calling `peft.utils.merge_utils.ties` per
tensor, in torch), and a memory-bandwidth probe (a large jnp copy). Prints medians after a warm-up call.

Population: 30 layers x {q,k,v,o,gate,up,down}_proj at rank 16 (hidden 576, intermediate 1536, 9 heads x 64,
3 kv heads x 64), float32: 4.88 M parameters (19.5 MB) per individual. Larger P keep the same per-layer shapes but
fewer layers so population + children fit `--mem-budget-gb`; figures are reported per 30-layer child.

Effective bytes (what an ideal one-pass implementation must move): crossover = cuts read every parent once (P S)
+ each child reads its K parents and writes itself ((K + 1) C S); the generation adds mutation's read + write of
the children (2 C S); S = bytes per individual.

The generation is selection (one jitted program) -> crossover (one jitted program, the one compiled for the
crossover-alone timing) -> mutation. Mutation: `--mutation lean` (default) is the bench's own minimal Gaussian noise
(per child picked with probability 0.15, then ~Binomial(n, 0.01) of each tensor's n genes at random positions get
N(0, 0.01^2); one jitted program per tensor shape, called per tensor); `--mutation helper` uses
genome_jax.operators.mutation.gaussian_mutation, which draws a mask and a noise value for every gene (measured ~9 s
for P=64 x 5 layers and ~2 GB of temporaries on the shared box, so it does not fit the default sizes here).
Wall and process-CPU seconds are both reported: on a box shared with other jobs, CPU seconds are the steadier
measure of work. The --scaling sizes run first, each in a fresh process (bounded memory on a shared box).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

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
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls after the warm-up (median reported; at most 3 for the --scaling sizes)")
    parser.add_argument("--baseline-children", type=int, default=3,
                        help="children the PEFT loop merges (its time is extrapolated to P); 0 skips the baseline")
    parser.add_argument("--baseline-threads", type=int, default=1,
                        help="torch threads for the baseline (1 is its fastest setting on the shared 2-core box)")
    parser.add_argument("--mem-budget-gb", type=float, default=1.5,
                        help="population + children bytes allowed for the --scaling sizes (layers shrink to fit)")
    parser.add_argument("--probe-mb", type=int, default=512, help="size of the bandwidth probe's array")
    parser.add_argument("--scaling-generation", action="store_true",
                        help="also time whole generations at the --scaling sizes (default: crossover alone there)")
    parser.add_argument("--mutation", choices=("lean", "helper"), default="lean",
                        help="lean: the bench's sparse Gaussian noise (default); helper: operators.mutation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emit-row", action="store_true", help=argparse.SUPPRESS)  # child process of --scaling


def _median_time(fn, repeats: int) -> tuple[float, float, float]:
    """(first call incl. compile, median wall, median process-CPU of `repeats` later calls), seconds; fn blocks."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return first, statistics.median(ts), statistics.median(cs)


def bandwidth_probe(mb: int, repeats: int) -> dict:
    """GB/s of a large elementwise copy (read + write counted), in place (donated) and into a fresh buffer."""
    import jax
    import jax.numpy as jnp

    n = mb * (1 << 20) // 4
    x = jnp.zeros((n,), jnp.float32)
    fresh = jax.jit(lambda a: a + 1.0)
    inplace = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    _, t_fresh, _ = _median_time(lambda: fresh(x).block_until_ready(), repeats)
    box = [x]

    def step():
        box[0] = inplace(box[0])
        box[0].block_until_ready()

    _, t_in, _ = _median_time(step, repeats)
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


def _mutate_leaf(key, i, x, picked, *, gene_rate: float, sigma: float):
    """One tensor stack x (P, ...) of the lean mutation (jitted once per shape; i is traced)."""
    import jax
    import jax.numpy as jnp

    P, n = x.shape[0], x[0].size
    cap = min(n, int(2 * n * gene_rate) + 8)
    k_live, k_pos, k_noise = jax.random.split(jax.random.fold_in(key, i), 3)
    # each of `cap` slots is live with probability n p / cap: Binomial(cap, n p / cap) ~ Binomial(n, p) genes
    live = jax.random.bernoulli(k_live, n * gene_rate / cap, (P, cap)) & picked[:, None]
    pos = jax.random.randint(k_pos, (P, cap), 0, n)
    noise = sigma * jax.random.normal(k_noise, (P, cap), x.dtype)
    flat = x.reshape(P, n).at[jnp.arange(P)[:, None], pos].add(jnp.where(live, noise, 0.0))
    return flat.reshape(x.shape)


_MUTATE_LEAF = {}


def lean_mutation(key, factors, *, individual_rate: float, gene_rate: float, sigma: float):
    """The bench's minimal Gaussian mutation: each child is picked with probability individual_rate; a picked
    child's tensor of n genes gets N(0, sigma^2) added at ~Binomial(n, gene_rate) random positions (drawn with
    replacement; O(mutated genes) random numbers instead of O(n)). Applied tensor by tensor with one jitted
    program per tensor shape: one program over all 420 tensors took 4 min to compile on the shared box.
    `factors` is consumed (its buffers are donated)."""
    import functools

    import jax

    leaves, treedef = jax.tree_util.tree_flatten(factors)
    k_ind, key = jax.random.split(key)
    picked = jax.random.bernoulli(k_ind, individual_rate, (leaves[0].shape[0],))
    # the children are donated: the scatter-add then updates them in place instead of copying every tensor
    fn = _MUTATE_LEAF.setdefault((gene_rate, sigma), jax.jit(functools.partial(_mutate_leaf, gene_rate=gene_rate,
                                                                                 sigma=sigma), donate_argnums=(2,)))
    return treedef.unflatten([fn(key, i, x, picked) for i, x in enumerate(leaves)])


def make_generation(config, P: int, K: int, mutation_kind: str):
    """select -> crossover -> mutate for P children as three jitted programs; returns (fn, what was used)."""
    import functools

    import jax
    import jax.numpy as jnp

    from genome_jax.operators import merge

    try:
        from genome_jax.operators import selection
    except ImportError:
        selection = None
    if selection is not None:
        select_fn = lambda k, f: selection.select_parents(k, f, P * K, method="roulette").reshape(P, K)
        used = "selection.select_parents(roulette)"
    else:
        select_fn = lambda k, f: jax.random.categorical(k, jax.nn.log_softmax(f), shape=(P, K)).astype(jnp.int32)
        used = "own roulette (operators.selection missing)"

    @jax.jit
    def select(key, fitness):
        k_sel, k_w = jax.random.split(key)
        w = jax.random.uniform(k_w, (P, K), jnp.float32, 0.05, 1.0)
        return select_fn(k_sel, fitness), w / jnp.sum(w, axis=1, keepdims=True)

    if mutation_kind == "helper":
        from genome_jax.operators import mutation

        mutate = jax.jit(lambda k, x: mutation.gaussian_mutation(k, x, individual_rate=0.15, gene_rate=0.01,
                                                                 sigma=0.01)[0])
        used += " + merge.crossover + mutation.gaussian_mutation"
    else:
        mutate = functools.partial(lean_mutation, individual_rate=0.15, gene_rate=0.01, sigma=0.01)
        used += " + merge.crossover + the bench's lean Gaussian mutation (one jitted program per tensor shape)"

    def generation(key, factors, fitness):
        k_sel, k_x, k_mut = jax.random.split(key, 3)
        parents, w = select(k_sel, fitness)
        children = merge.crossover(k_x, factors, parents, w, config=config)
        return jax.block_until_ready(mutate(k_mut, children))

    return generation, used


def peft_baseline(factors_np: dict, n_children: int, density: float, K: int, seed: int,
                  threads: int) -> tuple[float, float]:
    """Median (wall, process-CPU) seconds per child of the PEFT-style loop: per child, per tensor,
    merge_utils.ties in torch."""
    import numpy as np
    import torch
    from peft.utils.merge_utils import ties as peft_ties

    torch.set_num_threads(threads)
    tensors = {k: torch.from_numpy(v) for k, v in factors_np.items()}
    P = next(iter(tensors.values())).shape[0]
    rng = np.random.default_rng(seed)
    walls, cpus = [], []
    with torch.no_grad():
        for c in range(n_children + 1):  # the first child warms torch up and is not counted
            idx = rng.choice(P, size=K, replace=False)
            w = torch.tensor(rng.dirichlet(np.ones(K)), dtype=torch.float32)
            t0, c0 = time.perf_counter(), time.process_time()
            child = {name: peft_ties([t[i] for i in idx], w, density) for name, t in tensors.items()}
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert len(child) == len(tensors)
            if c:
                walls.append(dt)
                cpus.append(dc)
    return statistics.median(walls), statistics.median(cpus)


def measure_size(args, config, P: int, layers: int, repeats: int, baseline: bool, generation: bool = True):
    """Crossover alone and a whole generation at one population size (+ the PEFT loop when `baseline`)."""
    import jax
    import numpy as np

    from genome_jax.operators import merge

    K = args.parents
    key = jax.random.key(args.seed + P)
    factors = make_population(key, P, layers)
    fitness = jax.random.uniform(jax.random.fold_in(key, 1), (P,))
    S = layers * LAYER_PARAMS * 4  # bytes per individual
    idx = jax.random.randint(jax.random.fold_in(key, 2), (P, K), 0, P)
    w = jax.random.dirichlet(jax.random.fold_in(key, 3), np.ones(K), (P,))
    cross = lambda: jax.block_until_ready(merge.crossover(key, factors, idx, w, config=config))
    first, c_wall, c_cpu = _median_time(cross, repeats)
    print(f"  P={P} ({layers} layers): crossover: first call {first:.1f} s (compile), median {c_wall:.3f} s "
          f"wall / {c_cpu:.3f} s CPU", flush=True)
    g_wall = g_cpu = None
    if generation:
        gen, used = make_generation(config, P, K, args.mutation)
        first, g_wall, g_cpu = _median_time(lambda: gen(key, factors, fitness), repeats)
        print(f"  P={P}: generation [{used}]: first call {first:.1f} s, median {g_wall:.3f} s wall / "
              f"{g_cpu:.3f} s CPU", flush=True)
    row = {"P": P, "layers": layers, "scale": layers / args.layers, "c_wall": c_wall, "c_cpu": c_cpu,
           "g_wall": g_wall, "g_cpu": g_cpu, "c_bytes": (P + (K + 1) * P) * S, "g_bytes": (P + (K + 3) * P) * S}
    base = None
    if baseline and args.baseline_children > 0 and args.method == "ties" and args.space == "factors":
        host = {f"{p}.{ab}": np.array(v[ab]) for p, v in factors.items() for ab in ("A", "B")}
        b_wall, b_cpu = peft_baseline(host, args.baseline_children, args.density, K, args.seed,
                                      args.baseline_threads)
        base = (b_wall / row["scale"], b_cpu / row["scale"])
        print(f"  PEFT loop (merge_utils.ties per tensor, torch {args.baseline_threads} thread(s)): "
              f"{b_wall:.3f} s wall / {b_cpu:.3f} s CPU per child (median of {args.baseline_children} "
              f"children; extrapolated to P children)", flush=True)
    return row, base


def _row_in_subprocess(args, P: int, layers: int) -> dict:
    import subprocess

    argv = [sys.executable, "-m", "scripts.cli", "bench", "operators", "--population", str(P), "--layers",
            str(layers), "--scaling", "--baseline-children", "0", "--repeats", str(max(1, min(3, args.repeats))),
            "--probe-mb", "16", "--method", args.method, "--space", args.space, "--density", str(args.density),
            "--parents", str(args.parents), "--mutation", args.mutation, "--seed", str(args.seed), "--emit-row"]
    if args.scaling_generation:
        argv.append("--scaling-generation")
    res = subprocess.run(argv, capture_output=True, text=True)
    row = None
    for line in res.stdout.splitlines():
        if line.startswith("ROW "):
            row = json.loads(line[4:])
        elif line.startswith("  P="):
            print(line, flush=True)
    if res.returncode != 0 or row is None:
        raise RuntimeError(f"bench at P={P} failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    row["scale"] = layers / args.layers
    return row


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from genome_jax.errors import UserError
    from genome_jax.operators import merge

    if args.population < 2 or args.parents < 1 or args.layers < 1 or args.repeats < 1:
        raise UserError("--population must be >= 2 and --parents, --layers, --repeats >= 1")
    config = merge.MergeConfig(method=args.method, density=args.density, space=args.space)
    K = args.parents
    t_start = time.perf_counter()
    print(f"genome bench operators: method={args.method} space={args.space} density={args.density} K={K} "
          f"backend={jax.default_backend()} devices={jax.device_count()}", flush=True)
    if config.cut_method is not None and args.space == "factors":
        from kernels import threshold

        print(f"  threshold select: {threshold.resolve_impl(config.select)}; TIES kernel: "
              f"{'pallas' if jax.default_backend() == 'gpu' else 'fused jnp (XLA)'}")

    bw = bandwidth_probe(args.probe_mb, max(3, args.repeats))
    print(f"  bandwidth probe ({args.probe_mb} MB jnp copy, read + write): in place {bw['inplace_gbs']:.2f} GB/s, "
          f"into a fresh buffer {bw['fresh_gbs']:.2f} GB/s (page faults included)", flush=True)
    ref_bw = bw["inplace_gbs"]

    sizes = [args.population] + [p for p in (args.scaling or []) if p != args.population]
    # the extra sizes first, each in a fresh process (memory this process frees is not always returned to the OS,
    # and the box is shared), then the main size here
    extra = []
    for P in sizes[1:]:
        per_layer = 2 * P * LAYER_PARAMS * 4  # population + children
        extra.append(_row_in_subprocess(args, P, max(1, min(args.layers, int(args.mem_budget_gb * 1e9 // per_layer)))))
    row, base = measure_size(args, config, sizes[0], args.layers, args.repeats, baseline=not args.emit_row,
                             generation=not args.emit_row or args.scaling_generation)
    rows = [row] + extra
    if args.emit_row:
        print("ROW " + json.dumps(rows[0]), flush=True)
        return 0

    print()
    print("| P | layers | crossover s (wall / CPU) | generation s (wall / CPU) | children/s (generation) | "
          "eff. GB/s (cross / gen) | of probe BW (cross / gen) | speedup vs PEFT loop, cross (wall / CPU) | "
          "speedup, gen (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else f.format(v)
    for r in rows:
        P = r["P"]
        gbs_c = r["c_bytes"] / r["c_wall"] / 1e9
        gbs_g = r["g_bytes"] / r["g_wall"] / 1e9 if r["g_wall"] else None
        line = (f"| {P} | {r['layers']} | {r['c_wall']:.3f} / {r['c_cpu']:.3f} | {fmt(r['g_wall'], '{:.3f}')} / "
                f"{fmt(r['g_cpu'], '{:.3f}')} | {fmt(r['g_wall'] and P / r['g_wall'], '{:.1f}')} | "
                f"{gbs_c:.2f} / {fmt(gbs_g, '{:.2f}')} | {gbs_c / ref_bw:.0%} / "
                f"{fmt(gbs_g and gbs_g / ref_bw, '{:.0%}')} | ")
        if base:
            bw_, bc_ = base[0] * P * r["scale"], base[1] * P * r["scale"]
            line += (f"{bw_ / r['c_wall']:.1f}x / {bc_ / r['c_cpu']:.1f}x | "
                     f"{fmt(r['g_wall'] and bw_ / r['g_wall'], '{:.1f}x')} / "
                     f"{fmt(r['g_cpu'] and bc_ / r['g_cpu'], '{:.1f}x')} |")
        else:
            line += "- | - |"
        print(line)
    if base:
        print(f"\nPEFT loop: {base[0]:.3f} s wall / {base[1]:.3f} s CPU per {args.layers}-layer child, measured on "
              f"{args.baseline_children} children at P={sizes[0]} and extrapolated linearly to P (a child's cost "
              f"does not depend on P; rows with fewer layers are compared with the same fraction of a child).")
    print(f"Probe bandwidth (in place): {ref_bw:.2f} GB/s. Total bench time {time.perf_counter() - t_start:.0f} s.")
    return 0
