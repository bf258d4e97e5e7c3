"""`genome bench scale`: how the two halves of a generation scale.

1. Operators vs device count: one GENOME generation (`ask` + `tell`: selection, TIES crossover, mutation, elites)
   on a population of SmolLM2-shaped LoRAs, its population axis sharded over 1, 2, 4, 8 devices
   (`genome_jax.sharding`). Each device count runs in its own process: on CPU the devices are forced with
   XLA_FLAGS=--xla_force_host_platform_device_count=N (they share the machine's cores); on GPUs/TPUs the real
   devices are used (counts above the machine's are skipped). Baseline: the unsharded strategy on one device.
2. Scoring vs number of engines: individuals per second through the Ray backend (one vLLM engine per actor) with
   1 and 2 engines, on real task items. Baseline: 1 engine. Engine start-up is reported apart, not in the rate.

Prints one table (markdown) with medians of --repeats timed runs and ratios to the baselines; --json saves it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from evaluators.backends.peft_folder import content_hash
from evaluators.backends.ray_backend import RayBackend
from evaluators.tasks import get_task
from genome_jax import sharding
from genome_jax.errors import UserError
from genome_jax.model_store import default_model_path
from genome_jax.population import Population, PopulationMeta, export_population
from genome_jax.evolve import generation_keys
from genome_jax.strategies import make_strategy

_REPO = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", default="1,2,4,8", help="device counts for the operator part (default 1,2,4,8)")
    parser.add_argument("--population", type=int, default=32, help="population size P (default 32; a multiple "
                        "of every device count)")
    parser.add_argument("--layers", type=int, default=30, help="LoRA'd layers (default 30, as SmolLM2-135M)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed generations per setting (median; default 7)")
    parser.add_argument("--engines", default="1,2", help="engine counts for the scoring part (default 1,2)")
    parser.add_argument("--individuals", type=int, default=8, help="individuals scored per call (default 8)")
    parser.add_argument("--task", default="arc_c", help="task for the scoring part (default arc_c)")
    parser.add_argument("--n", type=int, default=8, help="items per individual (default 8)")
    parser.add_argument("--score_repeats", type=int, default=3, help="timed scoring calls per engine count (default 3)")
    parser.add_argument("--model_path", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--skip_operators", action="store_true")
    parser.add_argument("--skip_scoring", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one device-count measurement


# ---- part 1: operators vs devices (one child process per device count) ------------------------------------------

def _operator_child(spec: dict) -> dict:
    n_dev, P = spec["devices"], spec["population"]
    rng = np.random.default_rng(0)
    d, d_kv, r, k = 576, 192, spec["rank"], 4  # SmolLM2-135M: hidden 576, v_proj out 3 kv heads x 64
    experts = {}
    for layer in range(spec["layers"]):
        for name, d_out in (("q_proj", d), ("v_proj", d_kv)):
            experts[f"model.layers.{layer}.self_attn.{name}"] = {
                "A": jnp.asarray(rng.standard_normal((k, r, d)) / np.sqrt(d), jnp.float32),
                "B": jnp.asarray(rng.standard_normal((k, d_out, r)) * 0.02, jnp.float32)}
    strategy, params = make_strategy("genome", population_size=P, cross="ties", combine="linear",
                                     individual_mutation_rate=0.5, gene_mutation_rate=0.05)
    if spec["sharded"]:
        strategy = sharding.ShardedStrategy(strategy, sharding.population_mesh(n_devices=n_dev))
    k_init, k_run = jax.random.split(jax.random.PRNGKey(0))
    pop = strategy.initial_population(k_init, experts)
    fitness = jnp.asarray(rng.standard_normal(P), jnp.float32)
    state = strategy.init(k_run, pop, fitness, params)

    def generation(state):
        k_ask, k_tell = generation_keys(k_run, int(state.generation))
        children, state = strategy.ask(k_ask, state, params)
        f = jnp.asarray(rng.standard_normal(P), jnp.float32)
        state, _ = strategy.tell(k_tell, state, children, f, params)
        jax.block_until_ready(state)
        return state

    t0 = time.perf_counter()
    state = generation(state)  # compile
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        state = generation(state)
        times.append(time.perf_counter() - t0)
    leaf = jax.tree_util.tree_leaves(state.population)[0]
    return {"devices": n_dev, "sharded": spec["sharded"], "platform": jax.devices()[0].platform,
            "visible_devices": jax.device_count(), "shards": len(leaf.sharding.device_set),
            "median_s": statistics.median(times), "times_s": times, "compile_s": compile_s,
            "mbytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(state.population)) / 2**20}


def _run_child(spec: dict, platform: str, timeout: float = 900) -> dict:
    env = dict(os.environ)
    if platform == "cpu":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={spec['devices']}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(_REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        spec = dict(spec, out=out.name)
        proc = subprocess.run([sys.executable, "-m", "scripts.bench_scale", "--child", json.dumps(spec)],
                              cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"operator benchmark on {spec['devices']} device(s) failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def _platform() -> tuple[str, int]:
    """(platform, device count) JAX would use, probed in a child so this process never initialises a backend."""
    code = "import jax; print(jax.devices()[0].platform, jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 or not out.stdout.strip():
        return "cpu", 1
    name, count = out.stdout.split()[-2:]
    return name, int(count)


def bench_operators(args) -> list[dict]:
    counts = [int(x) for x in str(args.devices).split(",") if x.strip()]
    bad = [c for c in counts if args.population % c]
    if bad:
        raise UserError(f"--population {args.population} does not split over {bad[0]} devices")
    base = dict(population=args.population, layers=args.layers, rank=args.rank, repeats=args.repeats)
    rows = []

    platform, available = _platform()
    if platform != "cpu":  # real accelerators: only the counts this machine has
        skipped = [c for c in counts if c > available]
        if skipped:
            sys.stderr.write(f"genome: {available} {platform} device(s) here; skipping device counts {skipped}\n")
        counts = [c for c in counts if c <= available]
    settings = [(1, False)] + [(c, True) for c in counts]
    for n_dev, sharded in tqdm(settings, desc="operators vs devices", unit="setting", leave=False):
        rows.append(_run_child(dict(base, devices=n_dev, sharded=sharded), platform))
    t0 = rows[0]["median_s"]
    for r in rows:
        r["children_per_s"] = args.population / r["median_s"]
        r["ratio"] = t0 / r["median_s"]
    return rows


# ---- part 2: scoring vs engines ---------------------------------------------------------------------------------

def _make_adapters(model_path: str, n: int, rank: int, out_root: Path) -> list[str]:
    """n random SmolLM2-shaped q/v LoRAs written through the population exporter (real PEFT folders)."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    d = cfg["hidden_size"]
    d_kv = cfg["num_key_value_heads"] * cfg.get("head_dim", d // cfg["num_attention_heads"])
    rng = np.random.default_rng(0)
    factors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, d_out in (("q_proj", d), ("v_proj", d_kv)):
            factors[f"model.layers.{layer}.self_attn.{name}"] = {
                "A": jnp.asarray(rng.standard_normal((n, rank, d)) / np.sqrt(d), jnp.float32),
                "B": jnp.asarray(rng.standard_normal((n, d_out, rank)) * 0.05, jnp.float32)}
    meta = PopulationMeta(base_model=model_path, target_modules=("q_proj", "v_proj"), rank=rank,
                          names=tuple(f"ind{i}" for i in range(n)))
    return [str(p) for p in export_population(Population(factors=factors, meta=meta), out_root)]


def bench_scoring(args) -> list[dict]:
    if args.model_path:
        model_path = os.path.expanduser(args.model_path)
    else:
        model_path = str(default_model_path())
    task = get_task(args.task, formatter=model_path)
    reqs = task.build_requests(task.load("dev", args.n), task.mode)
    rows = []
    with tempfile.TemporaryDirectory(prefix="genome-bench-scale-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                     else None) as tmp:
        adapters = _make_adapters(model_path, args.individuals, args.rank, Path(tmp))
        jobs = [(a, content_hash(a), reqs) for a in adapters]
        reference = None
        for n_eng in [int(x) for x in str(args.engines).split(",") if x.strip()]:
            backend = RayBackend(model_path, num_actors=n_eng, max_model_len=2048,
                                 ray_init_kwargs={"num_cpus": max(n_eng, 1), "object_store_memory": 200 * 2**20})
            try:
                t0 = time.perf_counter()
                info = backend.start()
                startup = time.perf_counter() - t0
                backend.answer(jobs[:n_eng])  # warm every engine (first swap reads the base weights)
                times, split = [], []
                for _ in range(args.score_repeats):
                    t0 = time.perf_counter()
                    answers, timing = backend.answer(jobs)
                    times.append(time.perf_counter() - t0)
                    split.append(timing["jobs_per_actor"])
                if reference is None:
                    reference = answers
                same = answers == reference
            finally:
                backend.close()
            med = statistics.median(times)
            rows.append({"engines": n_eng, "platform": info[0]["platform"], "mode": info[0]["mode"],
                         "startup_s": startup, "median_s": med, "times_s": times, "jobs_per_engine": split[-1],
                         "individuals_per_s": len(jobs) / med, "requests_per_s": len(jobs) * len(reqs) / med,
                         "answers_match_1_engine": same})
    for r in rows:
        r["ratio"] = r["individuals_per_s"] / rows[0]["individuals_per_s"]
    return rows


# ---- report -----------------------------------------------------------------------------------------------------

def table(ops: list[dict], scoring: list[dict], args) -> str:
    lines = ["| part | setting | median time | throughput | vs baseline |", "|---|---|---|---|---|"]
    for r in ops:
        what = "unsharded, 1 device (baseline)" if not r["sharded"] else f"sharded over {r['devices']} {r['platform']} device(s)"
        lines.append(f"| operators: 1 generation (ask+tell), P={args.population}, {args.layers}x(q,v) r={args.rank} | "
                     f"{what} | {r['median_s'] * 1e3:.1f} ms | {r['children_per_s']:.0f} children/s | x{r['ratio']:.2f} |")
    for r in scoring:
        what = f"{r['engines']} {r['platform']} engine(s), {r['mode']} (start-up {r['startup_s']:.0f} s)"
        lines.append(f"| scoring: {args.individuals} individuals x {args.n} {args.task} items (Ray backend) | {what} | "
                     f"{r['median_s']:.2f} s | {r['individuals_per_s']:.2f} individuals/s | x{r['ratio']:.2f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.child:
        spec = json.loads(args.child)
        Path(spec["out"]).write_text(json.dumps(_operator_child(spec)))
        return 0
    ops = [] if args.skip_operators else bench_operators(args)
    scoring = [] if args.skip_scoring else bench_scoring(args)
    print(table(ops, scoring, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"operators": ops, "scoring": scoring}, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="genome bench scale")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
