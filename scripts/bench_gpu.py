"""`genome bench gpu`: the GPU path in one command (at most ~8 minutes on one H200), ready for a lent device.

(a) Operators at Llama-3-8B LoRA shapes (rank 16 on all 7 projections of 32 layers, hidden 4096, MLP 14336, 8 KV
    heads x 128; 168 MB of float32 factors per individual), P = 256: the TIES crossover with the Pallas kernel
    compiled for the device (`MergeConfig(kernel="pallas")`; interpreted only in the tiny CPU run) and a whole
    generation (`genome.ask` as `genome run` runs it), as a fraction of the HBM bandwidth measured by an in-place
    add in the same run, on the minimum bytes (parents read once, children written once, a second parent read when
    the population exceeds the cache: scripts.bench_operators.minimum_bytes). A size that does not fit device
    memory is halved until it does (printed).
(b) The JAX population scorer (`genome_jax.models.scorer.token_logprobs`): P adapters in one forward at a
    1B-parameter Llama shape (Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192, 32 heads, 8 KV heads, vocabulary
    128256; random bf16 weights, no checkpoint needed), against the base model's forward on the same number of
    tokens, in tokens/s, with model FLOP utilisation against the device's bf16 dense peak (`--peak_tflops`;
    known for H100/H200).
No vLLM and no model weights are needed. Without a GPU (`--size auto`) it runs tiny shapes (the test suite).
Ends with two machine-readable lines:
    gpu-operators: P=<P> crossover_s=<s> crossover_of_bw=<f> generation_s=<s> generation_of_bw=<f> bw_gbs=<GB/s>
    gpu-scorer: P=<P> population_tok_s=<t/s> base_tok_s=<t/s> ratio=<pop/base> mfu_population=<f> mfu_base=<f>
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp

from genome_jax.compile_cache import enable_compilation_cache
from genome_jax.errors import UserError
from genome_jax.models import llama, scorer
from genome_jax.operators import merge
from genome_jax.run_config import RunConfig
from genome_jax.strategies import strategy_params
from scripts.bench_operators import minimum_bytes

# Llama-3-8B (operators) and Llama-3.2-1B (scorer) shapes; "tiny" stands in for both on CPU
OPS_SHAPES = {"full": dict(hidden=4096, inter=14336, heads=32, kv=8, hd=128, layers=32, rank=16, P=256),
              "tiny": dict(hidden=64, inter=128, heads=4, kv=2, hd=16, layers=1, rank=4, P=8)}
SCORER_SHAPES = {"full": dict(vocab=128256, hidden=2048, inter=8192, heads=32, kv=8, hd=64, layers=16, rank=16, P=16,
                              batch=4, seq=256),
                 "tiny": dict(vocab=512, hidden=64, inter=128, heads=4, kv=2, hd=16, layers=1, rank=4, P=4, batch=2,
                              seq=16)}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, no sparsity
DEVICE_CACHE_BYTES = 64 << 20  # above the L2 of H100/H200 (50-60 MB): a population larger than this is re-read


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("auto", "full", "tiny"), default="auto",
                   help="auto: full shapes on a GPU, tiny elsewhere (default)")
    p.add_argument("--P", type=int, default=None, help="population for (a) (default 256 full, 8 tiny)")
    p.add_argument("--scorer_P", type=int, default=None, help="adapters in one forward for (b) (default 16 / 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up (medians)")
    p.add_argument("--probe_mb", type=int, default=None, help="bandwidth probe array (default 4096 full, 16 tiny)")
    p.add_argument("--peak_tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by device)")
    p.add_argument("--skip", choices=("operators", "scorer"), action="append", default=[], help="skip a part")
    p.add_argument("--json_out", default=None)


def _median(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of `repeats` later calls) in seconds; fn blocks."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts)


def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def llama_config(s: dict):
    return llama.LlamaConfig(vocab_size=s.get("vocab", 256), hidden_size=s["hidden"], intermediate_size=s["inter"],
                             num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["kv"], head_dim=s["hd"],
                             rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def random_factors(key, config, P: int, rank: int, dtype) -> dict:
    """Contract 1 factors of P random adapters on all 7 projections of every layer (A ~ N(0, 1/d_in), B small)."""
    out = {}
    for layer in range(config.num_layers):
        for name in llama.LORA_MODULES:
            key, ka, kb = jax.random.split(key, 3)
            d_out, d_in = config.module_shape(name)
            out[llama.module_path(layer, name)] = {
                "A": (jax.random.normal(ka, (P, rank, d_in), dtype) / math.sqrt(d_in)).astype(dtype),
                "B": (0.02 * jax.random.normal(kb, (P, d_out, rank), dtype)).astype(dtype)}
    return out


def random_params(key, config, dtype) -> dict:
    """Random Llama weights in the stacked layout of `genome_jax.models.llama` (what load_params returns)."""
    L, D = config.num_layers, config.hidden_size
    keys = iter(jax.random.split(key, 16))
    layers = {"input_norm": jnp.ones((L, D), dtype), "post_norm": jnp.ones((L, D), dtype)}
    for name in llama.LORA_MODULES:
        d_out, d_in = config.module_shape(name)
        layers[name] = (jax.random.normal(next(keys), (L, d_out, d_in), jnp.float32) / math.sqrt(d_in)).astype(dtype)
    return {"embed": (0.02 * jax.random.normal(next(keys), (config.vocab_size, D), jnp.float32)).astype(dtype),
            "final_norm": jnp.ones((D,), dtype), "layers": layers}


def bandwidth_gbs(mb: int, repeats: int) -> float:
    """GB/s (read + write) of an in-place add on an `mb` MB float32 array (donated: no allocation in the loop)."""
    n = mb * (1 << 20) // 4
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    box = [jnp.zeros((n,), jnp.float32)]

    def once():
        box[0] = step(box[0])
        box[0].block_until_ready()

    _, t = _median(once, max(3, repeats))
    return 2 * n * 4 / t / 1e9


def measure_operators(size: str, P: int, repeats: int, bw: float, on_gpu: bool) -> dict:
    """(a): TIES crossover (Pallas) and a whole generation at the `size` LoRA shapes; halves P on OOM."""
    s = OPS_SHAPES[size]
    config = llama_config(s)
    kernel = "pallas" if on_gpu else "pallas_interpret"
    llc = DEVICE_CACHE_BYTES if on_gpu else None
    out: dict = {"kernel": kernel}
    while True:
        try:
            key = jax.random.key(P)
            factors = random_factors(key, config, P, s["rank"], jnp.float32)
            S = sum(x[0].size * 4 for x in jax.tree_util.tree_leaves(factors))  # bytes per individual
            idx = jax.random.randint(jax.random.fold_in(key, 1), (P, 2), 0, P)
            w = jax.random.dirichlet(jax.random.fold_in(key, 2), jnp.ones(2), (P,))
            cfg = merge.MergeConfig(method="ties", density=0.2, kernel=kernel)
            cross = lambda: jax.block_until_ready(merge.crossover(key, factors, idx, w, config=cfg))
            first, t = _median(cross, repeats)
            byts = minimum_bytes(P, P, S, llc, P * S)
            out.update(P=P, bytes_per_individual=S, crossover_first_s=first, crossover_s=t,
                       crossover_gbs=byts / t / 1e9, crossover_of_bw=byts / t / 1e9 / bw)
            print(f"  (a) P={P}, {S / 1e6:.0f} MB per individual: TIES crossover [{kernel}] {t:.3f} s (first call "
                  f"{first:.1f} s), {out['crossover_gbs']:.0f} GB/s = {out['crossover_of_bw']:.0%} of measured "
                  f"bandwidth", flush=True)
            break
        except Exception as e:  # noqa: BLE001 (only device OOM is handled)
            if not _is_oom(e) or P <= 2:
                raise
            print(f"  (a) P={P} does not fit device memory for the crossover; trying P={P // 2}", flush=True)
            factors = None
            P //= 2
    del factors
    Pg = P
    while True:
        try:
            strat, params = strategy_params(RunConfig(tasks=("mmlu",), population_size=Pg, cross_method="ties"))
            key = jax.random.key(Pg + 1)
            pop = random_factors(key, config, Pg, s["rank"], jnp.float32)
            state = strat.init(jax.random.fold_in(key, 1), pop, jax.random.uniform(key, (Pg,)), params)
            del pop
            gk = jax.random.key_data(jax.random.key(Pg + 2))
            ask = lambda: jax.block_until_ready(strat.ask(gk, state, params))
            first, t = _median(ask, repeats)
            S = out["bytes_per_individual"]
            byts = minimum_bytes(Pg, Pg, S, llc, Pg * S)
            out.update(generation_P=Pg, generation_first_s=first, generation_s=t, generation_gbs=byts / t / 1e9,
                       generation_of_bw=byts / t / 1e9 / bw)
            print(f"  (a) whole generation (genome.ask: roulette, TIES, gaussian_mutation, elites), P={Pg}: {t:.3f} s "
                  f"(first call {first:.1f} s), {out['generation_gbs']:.0f} GB/s = {out['generation_of_bw']:.0%} of "
                  f"measured bandwidth", flush=True)
            return out
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e) or Pg <= 2:
                raise
            print(f"  (a) generation at P={Pg} does not fit device memory; trying P={Pg // 2}", flush=True)
            state = None
            Pg //= 2


def _forward_flops(config, tokens: int, seq: int, rank: int = 0) -> float:
    """Model FLOPs of a scoring forward: 2 per weight per token (7 projections, LoRA adds 2 r (d_in + d_out) per
    module), attention 4 T d_heads per token per layer (causal: half of QK^T and PV); the LM head is applied at
    one position per sequence (the scorer gathers) and is left out."""
    per_tok = 0.0
    for name in llama.LORA_MODULES:
        d_out, d_in = config.module_shape(name)
        per_tok += 2 * d_out * d_in + (2 * rank * (d_in + d_out) if rank else 0)
    per_tok += 2 * seq * config.num_heads * config.head_dim  # causal attention, QK^T + PV, halved
    return per_tok * config.num_layers * tokens


def measure_scorer(size: str, P: int, repeats: int, peak: float | None, dtype) -> dict:
    """(b): P adapters in one forward vs the base model's forward on the same number of tokens."""
    s = SCORER_SHAPES[size]
    config = llama_config(s)
    key = jax.random.key(7)
    params = random_params(key, config, dtype)
    lora = llama.stack_lora(random_factors(jax.random.fold_in(key, 1), config, P, s["rank"], dtype), config)
    B, T = s["batch"], s["seq"]
    tokens = jax.random.randint(jax.random.fold_in(key, 2), (B, T), 0, config.vocab_size)
    base_tokens = jnp.tile(tokens, (P, 1))  # the base model gets the same P x B x T tokens in one batch
    last = lambda b: (jnp.arange(b), jnp.full((b,), T - 1), jnp.zeros((b,), jnp.int32))
    gb, gt, gk = last(B)
    bb, bt, bk = last(P * B)
    pop = lambda: jax.block_until_ready(scorer.token_logprobs(params, lora, tokens, gb, gt, gk, config=config))
    base = lambda: jax.block_until_ready(scorer.token_logprobs(params, None, base_tokens, bb, bt, bk, config=config))
    first_p, tp = _median(pop, repeats)
    first_b, tb = _median(base, repeats)
    n_tok = P * B * T
    out = {"P": P, "batch": B, "seq": T, "population_tok_s": n_tok / tp, "base_tok_s": n_tok / tb,
           "population_first_s": first_p, "base_first_s": first_b}
    out["ratio"] = out["population_tok_s"] / out["base_tok_s"]
    fl_p, fl_b = _forward_flops(config, n_tok, T, s["rank"]), _forward_flops(config, n_tok, T)
    out["mfu_population"] = fl_p / tp / (peak * 1e12) if peak else float("nan")
    out["mfu_base"] = fl_b / tb / (peak * 1e12) if peak else float("nan")
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"  (b) scorer, {n_params / 1e9:.2f} B parameters ({jnp.dtype(dtype).name}), {P} adapters x {B} x {T} "
          f"tokens: population {out['population_tok_s']:.0f} tokens/s (first call {first_p:.1f} s), base "
          f"{out['base_tok_s']:.0f} tokens/s (first call {first_b:.1f} s), ratio {out['ratio']:.2f}; MFU population "
          f"{out['mfu_population']:.1%}, base {out['mfu_base']:.1%}", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    enable_compilation_cache()
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    size = args.size if args.size != "auto" else ("full" if on_gpu else "tiny")
    P = args.P or OPS_SHAPES[size]["P"]
    sP = args.scorer_P or SCORER_SHAPES[size]["P"]
    if P < 2 or sP < 1 or args.repeats < 1:
        raise UserError("--P must be >= 2, --scorer_P and --repeats >= 1")
    kind = getattr(dev, "device_kind", dev.platform)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    print(f"genome bench gpu: device {kind} ({dev.platform}), {size} shapes, jax {jax.__version__}", flush=True)
    figures: dict = {"device": kind, "size": size}
    bw = bandwidth_gbs(args.probe_mb or (4096 if size == "full" else 16), args.repeats)
    figures["bw_gbs"] = bw
    print(f"  bandwidth probe (in-place add): {bw:.0f} GB/s", flush=True)
    # the scorer first: it compiles one scanned layer, the operators one program over 448 tensors
    if "scorer" not in args.skip:
        figures["scorer"] = measure_scorer(size, sP, args.repeats, peak, jnp.bfloat16)
    if "operators" not in args.skip:
        figures["operators"] = measure_operators(size, P, args.repeats, bw, on_gpu)
    print(f"  total {time.perf_counter() - t_start:.0f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(figures, f, indent=2)
    if "operators" in figures:
        o = figures["operators"]
        print(f"gpu-operators: P={o['P']} crossover_s={o['crossover_s']:.4f} "
              f"crossover_of_bw={o['crossover_of_bw']:.3f} "
              f"generation_s={o['generation_s']:.4f} generation_of_bw={o['generation_of_bw']:.3f} bw_gbs={bw:.1f}")
    if "scorer" in figures:
        s = figures["scorer"]
        print(f"gpu-scorer: P={s['P']} population_tok_s={s['population_tok_s']:.1f} base_tok_s={s['base_tok_s']:.1f} "
              f"ratio={s['ratio']:.3f} mfu_population={s['mfu_population']:.3f} mfu_base={s['mfu_base']:.3f}")
    return 0
