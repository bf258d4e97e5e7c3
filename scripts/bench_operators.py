"""`genome bench operators`: one generation exactly as `genome run` executes it, on SmolLM2-135M-shaped LoRAs.

Timed: the strategy's jitted `ask` (`genome_jax.strategies.<Strategy>.ask` with the strategy and params `genome run`
builds from its defaults: roulette selection, TIES crossover at density 0.2 with K = 2 parents, the shipped
`operators.mutation.gaussian_mutation`, elites), and its `tell`; also the crossover alone
(`operators.merge.crossover`) as a component. Medians of `--repeats` calls after a warm-up call.

In the same run: the PEFT-style baseline (a Python loop over children calling `peft.utils.merge_utils.ties` per
tensor, in torch) and a memory-bandwidth probe (a large in-place jnp add). Effective bandwidth is counted on the
minimum bytes that must cross memory: every parent read once (P S), every child written once (C S), plus a second
read of the parents when the population (P S) exceeds the last-level cache (read from /sys; thresholds need one
pass over a parent before its merge can use them). S = bytes per individual.

Population: `--layers` x {q,k,v,o,gate,up,down}_proj at rank 16 (hidden 576, intermediate 1536, 9 heads x 64,
3 kv heads x 64), float32: 4.88 M parameters (19.5 MB) per 30-layer individual. Larger P keep the per-layer shapes
but fewer layers so that population + children fit `--mem-budget-gb`; cost is compared per child-layer. Every size
runs in a fresh process (memory a process frees is not always returned to the OS on a shared box).

Compile: `--compile` times the first `ask` + `tell` minus a steady call, in two fresh processes with the same shapes
and one new persistent cache folder (genome_jax.compile_cache): cold (empty cache), then warm. Prints
    operators-compile: cold=<s> warm=<s>
    operators-generation: P=<P> ask_s=<s> of_bw=<fraction> vs_peft=<x>
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from genome_jax.compile_cache import enable_compilation_cache
from genome_jax.errors import UserError
from genome_jax.operators import merge
from genome_jax.population import Population, PopulationMeta, export_adapter
from genome_jax.run_config import RunConfig
from genome_jax.strategies import strategy_params

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
                        help="more population sizes to show how cost grows with P (default 256 1024; none: skip)")
    parser.add_argument("--strategy", choices=("genome", "genome_plus"), default="genome",
                        help="the strategy whose ask is timed (default genome, `genome run`'s default)")
    parser.add_argument("--method", default="ties", help="crossover merge method (default ties)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median reported)")
    parser.add_argument("--baseline-children", type=int, default=3,
                        help="children the PEFT loop merges (its time is extrapolated to P); 0 skips the baseline")
    parser.add_argument("--baseline-threads", type=int, default=1,
                        help="torch threads for the baseline (1 is its fastest setting on the shared 2-core box)")
    parser.add_argument("--mem-budget-gb", type=float, default=3.0,
                        help="bytes allowed per size for 3 copies of the population (population, children, "
                             "headroom); layers shrink to fit")
    parser.add_argument("--probe-mb", type=int, default=512, help="size of the bandwidth probe's array")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="measure cold/warm compile of ask + tell in fresh processes (default on)")
    parser.add_argument("--export", type=int, default=8,
                        help="children exported as PEFT folders per size (export cost per child; 0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emit-row", action="store_true", help=argparse.SUPPRESS)  # child process: one size
    parser.add_argument("--emit-compile", action="store_true", help=argparse.SUPPRESS)  # child process: compile


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
    factors = {}
    for layer in range(layers):
        for mod, (sa, sb) in SHAPES.items():
            key, ka, kb = jax.random.split(key, 3)
            path = f"model.layers.{layer}.{mod}"
            factors[path] = {"A": jax.random.normal(ka, (P, *sa), jnp.float32) / sa[1] ** 0.5,
                             "B": 0.02 * jax.random.normal(kb, (P, *sb), jnp.float32)}
    return factors


def llc_bytes() -> int | None:
    """Size of the largest (last-level) CPU cache from sysfs, in bytes (None: unknown)."""
    best = None
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(root)):
            try:
                with open(os.path.join(root, d, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(root, d, "size")) as f:
                    txt = f.read().strip()
            except (OSError, ValueError):
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            size = int(txt.rstrip("KMG")) * mult
            if best is None or level > best[0]:
                best = (level, size)
    except OSError:
        pass
    if best is None:
        try:
            v = os.sysconf("SC_LEVEL3_CACHE_SIZE")
            return v if v > 0 else None
        except (ValueError, OSError):
            return None
    return best[1]


def minimum_bytes(n_parents_read: int, n_children: int, S: int, llc: int | None, population_bytes: int) -> int:
    """Bytes that must cross memory: parents read once, children written once, and the parents read a second
    time when the population does not fit the last-level cache (None: assume it does not)."""
    second = n_parents_read * S if llc is None or population_bytes > llc else 0
    return n_parents_read * S + n_children * S + second


def generation_setup(P: int, layers: int, strategy: str, method: str, seed: int):
    """The population, fitness, strategy module, params and initial state, as `genome run` builds them (P
    individuals; genome breeds P children per generation, genome_plus P offspring into a capacity of 2 P)."""
    strat, params = strategy_params(RunConfig(tasks=("mmlu",), method=strategy, population_size=P,
                                              cross_method=method))
    key = jax.random.key(seed + P)
    factors = make_population(key, P, layers)
    fitness = jax.random.uniform(jax.random.fold_in(key, 1), (P,))
    state = strat.init(jax.random.fold_in(key, 2), factors, fitness, params)
    return factors, fitness, strat, params, state


def measure_size(args, P: int, layers: int) -> dict:
    """One size: ask, tell and the crossover alone (+ export of a few children), medians; runs in its own process."""
    factors, fitness, strat, params, state = generation_setup(P, layers, args.strategy, args.method, args.seed)
    n = jax.tree_util.tree_leaves(state.population)[0].shape[0]  # rows the parents are drawn from
    key = jax.random.key_data(jax.random.key(args.seed))
    out = {}

    def ask():
        out["ask"] = jax.block_until_ready(strat.ask(key, state, params))

    first_ask, a_wall, a_cpu = _median_time(ask, args.repeats)
    children, st = out["ask"]
    C = jax.tree_util.tree_leaves(children)[0].shape[0]
    fit_c = jax.random.uniform(jax.random.fold_in(key, 5), (C,))
    tell = lambda: jax.block_until_ready(strat.tell(key, st, children, fit_c, params))
    first_tell, t_wall, _ = _median_time(tell, args.repeats)
    print(f"  P={P} ({layers} layers): {args.strategy}.ask: first call {first_ask:.1f} s, median {a_wall:.3f} s wall / "
          f"{a_cpu:.3f} s CPU; tell: median {t_wall:.3f} s", flush=True)

    cfg = strat.cross
    K = strat.n_parents
    idx = jax.random.randint(jax.random.fold_in(key, 2), (C, K), 0, n)
    w = jax.random.dirichlet(jax.random.fold_in(key, 3), np.ones(K), (C,))
    cross = lambda: jax.block_until_ready(merge.crossover(key, factors, idx, w, config=cfg))
    _, c_wall, c_cpu = _median_time(cross, args.repeats)
    print(f"  P={P}: crossover alone ({cfg.method}, K={K}): median {c_wall:.3f} s wall / {c_cpu:.3f} s CPU",
          flush=True)
    export_s = None
    if args.export > 0:
        export_s = _export_per_child(children, params, min(args.export, C))
        print(f"  P={P}: export: {1e3 * export_s:.1f} ms per child (median of {min(args.export, C)})", flush=True)
    return {"P": P, "C": C, "parents": n, "layers": layers, "ask_wall": a_wall, "ask_cpu": a_cpu, "tell_wall": t_wall,
            "cross_wall": c_wall, "cross_cpu": c_cpu, "first_ask": first_ask, "first_tell": first_tell,
            "export_s": export_s}


def _export_per_child(children, params, n: int) -> float:
    """Median seconds of `export_adapter` for one child of this population (written to tmpfs, then removed)."""
    C = __import__("jax").tree_util.tree_leaves(children)[0].shape[0]
    meta = PopulationMeta(base_model="bench", target_modules=tuple(sorted({m.split(".")[-1] for m in SHAPES})),
                          rank=16, names=tuple(f"c{i}" for i in range(C)))
    pop = Population(factors=children, meta=meta)
    root = tempfile.mkdtemp(prefix="genome-bench-export-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        export_adapter(pop, 0, os.path.join(root, "warm"))
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            export_adapter(pop, i, os.path.join(root, f"c{i}"))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compile_probe(args) -> dict:
    """Child process: seconds the first ask + tell spend beyond a steady call (compile, or loading from the cache)."""
    where = enable_compilation_cache(min_compile_time_s=0.0)  # tiny shapes too (`genome run` stores >= 0.1 s)
    stored = sorted(f.name.split("-")[0] for f in where.iterdir()) if where is not None else []
    factors, fitness, strat, params, state = generation_setup(args.population, args.layers, args.strategy,
                                                              args.method, args.seed)
    key = jax.random.key_data(jax.random.key(args.seed))
    t0 = time.perf_counter()
    children, st = jax.block_until_ready(strat.ask(key, state, params))
    t1 = time.perf_counter()
    C = jax.tree_util.tree_leaves(children)[0].shape[0]
    fit = jax.numpy.zeros((C,))
    jax.block_until_ready(strat.tell(key, st, children, fit, params))
    t2 = time.perf_counter()
    jax.block_until_ready(strat.ask(key, state, params))
    t3 = time.perf_counter()
    jax.block_until_ready(strat.tell(key, st, children, fit, params))
    t4 = time.perf_counter()
    return {"compile_s": max(0.0, (t1 - t0) - (t3 - t2)) + max(0.0, (t2 - t1) - (t4 - t3)),
            "first_s": t2 - t0, "steady_s": t4 - t2, "cache": str(where),
            "ask_was_stored": "jit__ask_plan" in stored, "tell_was_stored": "jit__tell_plan" in stored,
            "programs_stored_before": len(stored)}


def _child(args, extra: list[str], env: dict | None = None, tag: str = "ROW ") -> dict:
    argv = [sys.executable, "-m", "scripts.cli", "bench", "operators", "--strategy", args.strategy, "--method",
            args.method, "--repeats", str(args.repeats), "--seed", str(args.seed), "--export", str(args.export),
            *extra]
    res = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    row = None
    for line in res.stdout.splitlines():
        if line.startswith(tag):
            row = json.loads(line[len(tag):])
        elif line.startswith("  P="):
            print(line, flush=True)
    if res.returncode != 0 or row is None:
        raise RuntimeError(f"bench child {' '.join(extra)} failed (exit {res.returncode}): {res.stderr.strip()[-800:]}")
    return row


def _layers_for(args, P: int) -> int:
    per_layer = 3 * P * LAYER_PARAMS * 4  # population + children + headroom (kept at 3 so sizes compare across runs)
    return max(1, min(args.layers, int(args.mem_budget_gb * 1e9 // per_layer)))


def run(args: argparse.Namespace) -> int:
    if args.population < 4 or args.layers < 1 or args.repeats < 1:
        raise UserError("--population must be >= 4 and --layers, --repeats >= 1")
    if args.emit_row:
        if os.environ.get("GENOME_JAX_COMPILE_CACHE"):  # a child of this bench: the probes' cache folder

            enable_compilation_cache()
        print("ROW " + json.dumps(measure_size(args, args.population, args.layers)), flush=True)
        return 0
    if args.emit_compile:
        print("COMPILE " + json.dumps(compile_probe(args)), flush=True)
        return 0
    t_start = time.perf_counter()
    llc = llc_bytes()
    print(f"genome bench operators: strategy={args.strategy} (ask as `genome run` runs it) crossover={args.method} "
          f"backend={jax.default_backend()} devices={jax.device_count()} LLC={llc and llc >> 20} MiB "
          f"load={os.getloadavg()[0]:.1f}", flush=True)
    bw = bandwidth_probe(args.probe_mb, max(3, args.repeats))
    ref_bw = bw["inplace_gbs"]
    print(f"  bandwidth probe ({args.probe_mb} MB jnp add, read + write): in place {ref_bw:.2f} GB/s, into a fresh "
          f"buffer {bw['fresh_gbs']:.2f} GB/s (page faults included)", flush=True)

    comp = None
    cache = tempfile.mkdtemp(prefix="genome-compile-cache-")
    if args.compile:
        env = {"GENOME_JAX_COMPILE_CACHE": cache}
        extra = ["--population", str(args.population), "--layers", str(args.layers), "--emit-compile"]
        cold = _child(args, extra, env, "COMPILE ")
        warm = _child(args, extra, env, "COMPILE ")
        comp = (cold["compile_s"], warm["compile_s"])
        print(f"  compile of ask + tell (P={args.population}, {args.layers} layers), each in a fresh process: cold "
              f"{cold['compile_s']:.1f} s (empty cache), warm {warm['compile_s']:.1f} s (ask stored before: cold "
              f"{cold['ask_was_stored']}, warm {warm['ask_was_stored']}; tell: {cold['tell_was_stored']}, "
              f"{warm['tell_was_stored']})", flush=True)

    # every size in a fresh process (bounded memory on a shared box)
    extra = [_child(args, ["--population", str(P), "--layers", str(_layers_for(args, P)), "--emit-row"])
             for P in (args.scaling or []) if P != args.population]
    # the main size in a fresh process too, reusing the probes' programs (as a second `genome run` would)
    try:
        rows = [_child(args, ["--population", str(args.population), "--layers", str(args.layers), "--emit-row"],
                       {"GENOME_JAX_COMPILE_CACHE": cache})] + extra
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    base = None
    if args.baseline_children > 0 and args.method == "ties":
        factors = make_population(jax.random.key(args.seed), 8, args.layers)
        host = {f"{p}.{ab}": np.array(v[ab]) for p, v in factors.items() for ab in ("A", "B")}
        del factors
        base = peft_baseline(host, args.baseline_children, 0.2, 2, args.seed, args.baseline_threads)
        print(f"  PEFT loop (merge_utils.ties per tensor, torch {args.baseline_threads} thread(s)): {base[0]:.3f} s "
              f"wall / {base[1]:.3f} s CPU per {args.layers}-layer child (median of {args.baseline_children})",
              flush=True)

    print()
    print("| P (children) | layers | ask s (wall / CPU) | ms per child-layer | x P=first | minimum GB moved | "
          "eff. GB/s | of probe BW | vs PEFT loop (wall / CPU) | crossover alone s | cross. of BW | tell s | "
          "export ms/child |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = None
    per0 = None
    for r in rows:
        S = r["layers"] * LAYER_PARAMS * 4
        pop_bytes = r["parents"] * S
        g_bytes = minimum_bytes(r["parents"], r["C"], S, llc, pop_bytes)
        c_bytes = minimum_bytes(r["parents"], r["C"], S, llc, pop_bytes)
        gbs = g_bytes / r["ask_wall"] / 1e9
        per = 1e3 * r["ask_wall"] / (r["C"] * r["layers"])
        per0 = per0 or per
        line = (f"| {r['P']} ({r['C']}) | {r['layers']} | {r['ask_wall']:.3f} / {r['ask_cpu']:.3f} | {per:.3f} | "
                f"{per / per0:.2f} | {g_bytes / 1e9:.2f} | {gbs:.2f} | {gbs / ref_bw:.0%} | ")
        vs = None
        if base:
            scale = r["layers"] / args.layers
            vs = (base[0] * scale * r["C"] / r["ask_wall"], base[1] * scale * r["C"] / r["ask_cpu"])
            line += f"{vs[0]:.1f}x / {vs[1]:.1f}x | "
        else:
            line += "- | "
        ex = "-" if r.get("export_s") is None else f"{1e3 * r['export_s']:.1f}"
        line += (f"{r['cross_wall']:.3f} | {c_bytes / r['cross_wall'] / 1e9 / ref_bw:.0%} | {r['tell_wall']:.3f} | "
                 f"{ex} |")
        print(line)
        if summary is None:
            summary = (r["P"], r["ask_wall"], gbs / ref_bw, vs[0] if vs else float("nan"))
    print(f"\nMinimum bytes: parents read once + children written once + a second parent read when the population "
          f"exceeds the {llc and llc >> 20} MiB LLC. Probe bandwidth (in place): {ref_bw:.2f} GB/s. "
          f"Total bench time {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.1f}.")
    if comp is not None:
        print(f"operators-compile: cold={comp[0]:.1f} warm={comp[1]:.1f}")
    print(f"operators-generation: P={summary[0]} ask_s={summary[1]:.3f} of_bw={summary[2]:.2f} "
          f"vs_peft={summary[3]:.1f}")
    return 0

def peft_baseline(factors_np: dict, n_children: int, density: float, K: int, seed: int,
                  threads: int) -> tuple[float, float]:
    """Median (wall, process-CPU) seconds per child of the PEFT-style loop: per child, per tensor,
    merge_utils.ties in torch."""
    import torch  # heavy (torch, peft): only the PEFT baseline needs them
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
