"""`genome bench scorer`: the JAX population scorer (genome_jax.models.scorer) on P adapters next to the same JAX
model without adapters, on the same choice_logprob requests, in the same run; optionally next to vLLM's CPU base
model on the same requests (a managed vLLM worker process; prefix caching off).

Throughput is in scored samples per second: the base model scores N samples, the population P x N (individual,
sample) pairs. Runs alternate base / population so load changes on a shared machine hit both; medians reported.
Ends with one line: `scorer-throughput: population=<samples/s> base=<samples/s> ratio=<pop/base> vllm_base=<...>`.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import jax
import numpy as np
from transformers import AutoTokenizer

from evaluators.backends.managed import ManagedBackend
from evaluators.tasks import get_task
from genome_jax.model_store import default_model_path
from genome_jax.models import llama, scorer
from genome_jax.population import load_population


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", default=None)
    p.add_argument("--adapters", nargs="+", default=None, metavar="DIR",
                   help="PEFT adapter folders to score (default: --P random rank --rank adapters)")
    p.add_argument("--P", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=None, help="random adapters' modules (default: all linear)")
    p.add_argument("--task", default="mmlu")
    p.add_argument("--n", type=int, default=32, help="requests (dev items)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm", action="store_true", help="also time vLLM's CPU base model on the same requests")


def _random_factors(key, config, n_pop: int, rank: int, targets) -> dict:
    out = {}
    for layer in range(config.num_layers):
        for name in targets:
            key, ka, kb = jax.random.split(key, 3)
            d_out, d_in = config.module_shape(name)
            out[llama.module_path(layer, name)] = {
                "A": jax.random.normal(ka, (n_pop, rank, d_in)) / math.sqrt(d_in),
                "B": 0.02 * jax.random.normal(kb, (n_pop, d_out, rank)),
            }
    return out


def run(args: argparse.Namespace) -> int:
    model_path = args.model_path
    if model_path is None:
        model_path = default_model_path()
    model_path = os.fspath(model_path)
    task = get_task(args.task, formatter=model_path)
    reqs = task.build_requests(task.load("dev", args.n), "choice_logprob")
    n = len(reqs)
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    config, params = llama.load_params(model_path)
    if args.adapters:
        pop = load_population(args.adapters)
        factors, what = pop.factors, f"{pop.size} adapters from disk (rank {pop.meta.rank}, {pop.meta.target_modules})"
    else:
        targets = tuple(args.targets or llama.LORA_MODULES)
        factors = _random_factors(jax.random.key(0), config, args.P, args.rank, targets)
        what = f"{args.P} random adapters (rank {args.rank}, {targets})"
    n_pop = next(iter(factors.values()))["A"].shape[0]
    enc = scorer.encode_requests(reqs, tok)
    n_tokens = sum(len(s) for s in enc.seqs)
    print(f"bench scorer: {what}; {n} {task.name} dev requests ({len(enc.seqs)} sequences, {n_tokens} tokens), "
          f"batch {args.batch_size}", file=sys.stderr, flush=True)

    def timed(f):
        t0 = time.perf_counter()
        out = f()
        return time.perf_counter() - t0, out

    kw = dict(batch_size=args.batch_size, pad_id=tok.pad_token_id or 0)
    t_compile_b, base_lp = timed(lambda: scorer.score_encoded(params, config, None, enc, **kw))
    t_compile_p, pop_lp = timed(lambda: scorer.score_encoded(params, config, factors, enc, **kw))
    print(f"first calls (compile + run): base {t_compile_b:.1f}s, population {t_compile_p:.1f}s", file=sys.stderr)
    tb, tp = [], []
    for rep in range(args.repeats):
        tb.append(timed(lambda: scorer.score_encoded(params, config, None, enc, **kw))[0])
        tp.append(timed(lambda: scorer.score_encoded(params, config, factors, enc, **kw))[0])
        print(f"  repeat {rep + 1}: base {n / tb[-1]:.2f} samples/s, population {n_pop * n / tp[-1]:.2f} samples/s",
              file=sys.stderr, flush=True)
    base = n / statistics.median(tb)
    popu = n_pop * n / statistics.median(tp)
    changed = float((np.nanargmax(pop_lp, -1) != np.nanargmax(base_lp[0], -1)[None]).mean())
    print(f"JAX base model: {base:.2f} samples/s; JAX population P={n_pop}: {popu:.2f} samples/s "
          f"(ratio {popu / base:.2f}); {changed:.0%} of the population's predictions differ from the base model's")
    vllm = float("nan")
    if args.vllm:
        eng = ManagedBackend(model_path, prefix_caching=False)
        try:
            eng.start()
            eng.answer([(None, None, reqs[:4])])  # warm-up
            runs = [n / timed(lambda: eng.answer([(None, None, reqs)]))[0] for _ in range(args.repeats)]
        finally:
            eng.close()
        vllm = statistics.median(runs)
        print(f"vLLM CPU base model (same requests): {vllm:.2f} samples/s")
    print(f"scorer-throughput: population={popu:.3f} base={base:.3f} ratio={popu / base:.3f} vllm_base={vllm:.3f}")
    return 0
