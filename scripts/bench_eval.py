"""`genome bench eval`: population scoring throughput, three ways, in one run on the same requests, per scoring mode.

  (a) ours: the fastest path for the platform (CPU: W+ΔW swapped into a live engine per individual, one batch per
      individual; GPU: multi-LoRA, all individuals in flight), adapters exported to tmpfs first;
  (b) the original GENOME protocol: one adapter at a time through vLLM's LoRA path (save the PEFT folder, load it into
      the engine, score, unload; no fixed sleeps), in the model's own dtype;
  (c) the base model alone on the same P x N requests: the ceiling (the faster of one batch of P x N and P batches
      of N, the shape (a) runs), on (a)'s engine (the model's own dtype, bf16 for SmolLM2, unless --dtype) and,
      when (a) runs another dtype, also on a plain engine in the checkpoint's dtype; the faster is the ceiling.
Exactness check: a weight-swap engine in the other dtype (float32 when (a) runs bf16, the model's bf16 when (a) runs
float32, i.e. on a CPU without native bf16) scores the same individuals once, and the share of samples where its
prediction equals (a)'s is reported (bf16 rounding of W + ΔW vs float32).
Prefix caching is off everywhere (the same prompts repeat across individuals and would be served from cache).
(a) and (c) run on one engine, interleaved, `--repeats` times (medians); (b) on a LoRA engine afterwards, once.
Every engine serves every `--scoring` mode in turn; only one engine is alive at a time. Ends with one
machine-readable line per scoring mode:
    score-throughput: mode=<mode> ours=<samples/s> base=<samples/s> ratio=<ours/base> one_at_a_time=<samples/s>
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from safetensors.numpy import save_file

from evaluators.backends.managed import ManagedBackend
from evaluators.backends.peft_folder import adapter_info, content_hash
from evaluators.backends.scratch import scratch_dir
from evaluators.protocol import ChoiceResponse
from evaluators.tasks import get_task
from genome_jax.model_store import default_model_path

SCORING_MODES = ("choice_logprob", "loglik")  # the default --scoring: every mode that scores multiple choice

DIMS = {  # Llama-family module -> (d_out, d_in) from the HF config
    "q_proj": lambda c: (c["num_attention_heads"] * _hd(c), c["hidden_size"]),
    "k_proj": lambda c: (c["num_key_value_heads"] * _hd(c), c["hidden_size"]),
    "v_proj": lambda c: (c["num_key_value_heads"] * _hd(c), c["hidden_size"]),
    "o_proj": lambda c: (c["hidden_size"], c["num_attention_heads"] * _hd(c)),
    "gate_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "up_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "down_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
}


def _hd(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default=None, help="default: the cached SmolLM2-135M-Instruct")
    parser.add_argument("--adapters", nargs="+", default=None, metavar="DIR",
                        help="trained PEFT adapters to use (default: --P random ones)")
    parser.add_argument("--P", type=int, default=8, help="number of random adapters (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="target modules of random adapters")
    parser.add_argument("--task", default="mmlu", help="task whose dev items make the requests (default mmlu)")
    parser.add_argument("--scoring", nargs="+", default=list(SCORING_MODES), metavar="MODE",
                        help="scoring modes measured, one score-throughput line each "
                             f"(default: {' '.join(SCORING_MODES)})")
    parser.add_argument("--n", type=int, default=32, help="samples per adapter (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of (a) and (c) (medians reported)")
    parser.add_argument("--eval_mode", default="auto", choices=("auto", "swap", "lora"), help="path used for (a)")
    parser.add_argument("--dtype", default=None,
                        help="engine dtype for (a)/(c) (default auto: the model's bf16, float32 on CPUs without bf16)")
    parser.add_argument("--skip_other_dtype", action="store_true",
                        help="skip the engine in the other dtype (bf16 <-> float32): its base ceiling and the "
                             "prediction agreement of its weight swap with (a)")
    parser.add_argument("--other_repeats", type=int, default=1, help="repeats of the base model in the other dtype")
    parser.add_argument("--lora_dtype", default="auto", help="engine dtype for (b) (default: the model's)")
    parser.add_argument("--skip_one_at_a_time", action="store_true", help="skip (b) (it is slow on CPU)")
    parser.add_argument("--all_in_flight", action="store_true",
                        help="also measure all adapters in flight with multi-LoRA on the (b) engine")
    parser.add_argument("--json_out", default=None, help="also write the figures to this JSON file")


def write_random_adapter(out_dir: str, cfg: dict, rank: int, targets: list[str], seed: int) -> str:
    """A PEFT folder with A ~ N(0, 1/d_in), B ~ N(0, 0.02^2), lora_alpha = rank (scale 1); written atomically."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in targets:
            if m not in DIMS:
                raise SystemExit(f"genome: error: unknown target module {m!r} (one of {', '.join(DIMS)})")
            d_out, d_in = DIMS[m](cfg)
            sub = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{sub}.{m}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * 0.02).astype(np.float32)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
                   "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
                   "base_model_name_or_path": cfg.get("_name_or_path", "")}, f, indent=2)
    os.replace(tmp, out_dir)
    return out_dir


def _export(sources: list[str], dest: str) -> list[str]:
    """The export step of one generation: copy every adapter folder into a fresh tmpfs folder."""
    out = []
    for i, s in enumerate(sources):
        d = os.path.join(dest, f"ind{i:03d}")
        shutil.copytree(s, d)
        out.append(d)
    return out


def _maxdiff(a: list, b: list) -> tuple[float, float]:
    """(max |Δ logprob|, share of samples with the same argmax) between two response lists (choice mode)."""
    if not a or not isinstance(a[0], ChoiceResponse):
        same = sum(x == y for x, y in zip(a, b)) / max(len(a), 1)
        return float("nan"), same
    md = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra.logprobs, rb.logprobs))
    same = sum(max(range(len(ra.logprobs)), key=ra.logprobs.__getitem__) ==
               max(range(len(rb.logprobs)), key=rb.logprobs.__getitem__) for ra, rb in zip(a, b)) / len(a)
    return md, same


def _base_rates(eng, reqs: list, P: int) -> tuple[float, float]:
    """The ceiling: samples/s of the base model (no adapter) on the P x N requests, as one batch of P x N and as
    P batches of N (the shape ours runs; on CPU it measured faster: a smaller KV cache footprint). Callers keep
    the faster of the two."""
    total = len(reqs) * P
    t0 = time.perf_counter()
    eng.answer([(None, None, reqs * P)])
    one_batch = total / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    eng.answer([(None, None, reqs)] * P)
    return one_batch, total / (time.perf_counter() - t0)


def _agreement(task, items, a: list, b: list) -> float:
    """Share of samples on which two response lists give the same prediction (the task's own reading)."""
    pa = task.score(items, a, task.mode).predictions
    pb = task.score(items, b, task.mode).predictions
    return sum(x == y for x, y in zip(pa, pb)) / max(len(pa), 1)


def _ours_and_base(eng, reqs: list, sources: list[str], scratch: str, repeats: int, label: str) -> dict:
    """(a) and (c) on one engine, interleaved `repeats` times; figures + (a)'s last answers."""
    P, n = len(sources), len(reqs)
    total = P * n
    eng.answer([(None, None, reqs[: min(4, n)])])  # warm-up
    ours, base, share, exp_s, load_s, base_shapes = [], [], [], [], [], []
    outs = None
    for rep in range(repeats):
        one_batch, per_ind = _base_rates(eng, reqs, P)
        base.append(max(one_batch, per_ind))
        base_shapes.append((one_batch, per_ind))
        gen_dir = tempfile.mkdtemp(prefix=f"gen{rep}-", dir=scratch)
        t0 = time.perf_counter()
        dirs = _export(sources, gen_dir)
        keys = [content_hash(d) for d in dirs]
        t_exp = time.perf_counter() - t0
        res, timing = eng.answer(list(zip(dirs, keys, [reqs] * P)))
        wall = time.perf_counter() - t0
        shutil.rmtree(gen_dir, ignore_errors=True)
        ours.append(total / wall)
        t_load = timing.get("swap_s", 0.0) + timing.get("lora_load_s", 0.0)
        share.append((t_exp + t_load) / wall)
        exp_s.append(t_exp)
        load_s.append(t_load / P)
        outs = res
        print(f"  [{label}] repeat {rep + 1}/{repeats}: ours {ours[-1]:.2f} samples/s, base {base[-1]:.2f} samples/s "
              f"(one batch {one_batch:.2f}, {P} batches {per_ind:.2f}), ours/base {ours[-1] / base[-1]:.2f}; "
              f"export+load {100 * share[-1]:.1f}% of ours' wall time (export {t_exp:.2f}s for {P}, load "
              f"{t_load / P:.3f}s per adapter)", flush=True)
    return dict(ours=statistics.median(ours), base=statistics.median(base),
                ours_export_load_share=statistics.median(share),
                ours_runs=ours, base_runs=base, base_one_batch_vs_per_individual=base_shapes,
                ours_export_s=statistics.median(exp_s), ours_load_s_per_adapter=statistics.median(load_s),
                outs=outs)


def run(args: argparse.Namespace) -> int:
    if args.model_path is None:
        args.model_path = str(default_model_path())
    model = os.path.expanduser(args.model_path)
    with open(os.path.join(model, "config.json")) as f:
        mcfg = json.load(f)
    cases = {}  # scoring mode -> (task, items, requests)
    for mode in dict.fromkeys(args.scoring):
        task = get_task(args.task, formatter=model, mode=mode)
        items = task.load("dev", args.n)
        cases[task.mode] = (task, items, task.build_requests(items, task.mode))

    scratch = scratch_dir("genome-bench-")
    src = os.path.join(scratch, "src")
    os.makedirs(src)
    try:
        if args.adapters:
            sources = [os.path.abspath(a) for a in args.adapters]
        else:
            sources = [write_random_adapter(os.path.join(src, f"rand{i}"), mcfg, args.rank, args.targets, seed=i)
                       for i in range(args.P)]
        max_rank = max(adapter_info(a).rank for a in sources)
        max_lora_rank = next(r for r in (8, 16, 32, 64, 128, 256, 512) if r >= max_rank)
        P = len(sources)
        print(f"bench eval: P={P} adapters (rank {max_rank}), {args.task} dev samples, scoring modes "
              f"{', '.join(cases)} (" + ", ".join(f"{m}: n={len(c[2])}" for m, c in cases.items())
              + f"); tmpfs: {scratch}", flush=True)
        figures: dict = {"P": P, "task": args.task, "rank": max_rank,
                         "modes": {m: {"n": len(c[2])} for m, c in cases.items()}}
        outs_a = {}

        # ---- (a) ours + (c) base, one engine, interleaved repeats, every mode ---------------------------------------
        eng = ManagedBackend(model, mode=args.eval_mode, dtype=args.dtype, max_lora_rank=max_lora_rank,
                             max_loras=min(P, 8), prefix_caching=False)
        try:
            t0 = time.perf_counter()
            info = eng.start()
            figures.update(startup_s=time.perf_counter() - t0, ours_mode=info["mode"], ours_dtype=info["dtype"])
            for m, (_, _, reqs) in cases.items():
                got = _ours_and_base(eng, reqs, sources, scratch, args.repeats, f"{m}, {info['mode']}, {info['dtype']}")
                outs_a[m] = got.pop("outs")
                figures["modes"][m].update(got)
        finally:
            eng.close()

        # ---- the other dtype, one engine: (c') the base model in the checkpoint's own dtype when (a) runs another
        # (float32 on a CPU without native bf16), and the same individuals through a weight swap in that dtype once:
        # the share of samples where its prediction equals (a)'s (bf16 rounding of W + ΔW vs float32) --------------
        native = str(mcfg.get("dtype") or mcfg.get("torch_dtype") or "")
        other = native if native and native != figures["ours_dtype"] else "float32"
        if other != figures["ours_dtype"] and not args.skip_other_dtype:
            eng = ManagedBackend(model, mode="swap", dtype=other, prefix_caching=False)
            try:
                eng.start()
                for m, (task, items, reqs) in cases.items():
                    f = figures["modes"][m]
                    eng.answer([(None, None, reqs[: min(4, len(reqs))])])  # warm-up
                    if other == native:
                        runs = [max(_base_rates(eng, reqs, P)) for _ in range(args.other_repeats)]
                        f.update(base_native_dtype=native, base_native=statistics.median(runs), base_native_runs=runs,
                                 base_ours_dtype=f["base"])
                        f["base"] = max(f["base"], f["base_native"])  # the ceiling is the faster one
                        print(f"  [{m}] base in {native}: {f['base_native']:.2f} samples/s", flush=True)
                    dirs = _export(sources, tempfile.mkdtemp(prefix="other-", dir=scratch))
                    t0 = time.perf_counter()
                    res, _ = eng.answer([(d, content_hash(d), reqs) for d in dirs])
                    f.update(other_dtype=other, other_swap=P * len(reqs) / (time.perf_counter() - t0))
                    f["other_swap_same_prediction"] = statistics.mean(
                        _agreement(task, items, a, b) for a, b in zip(outs_a[m], res))
                    f["other_swap_max_abs_logprob_diff"] = max(_maxdiff(a, b)[0] for a, b in zip(outs_a[m], res))
                    print(f"  [{m}] {other} swap: {f['other_swap']:.2f} samples/s; same prediction as "
                          f"{figures['ours_dtype']} on {100 * f['other_swap_same_prediction']:.1f}% of "
                          f"{P * len(reqs)} samples", flush=True)
            finally:
                eng.close()

        # ---- (b) one adapter at a time through the LoRA path --------------------------------------------------------
        if not args.skip_one_at_a_time or args.all_in_flight:
            eng = ManagedBackend(model, mode="lora", dtype=None if args.lora_dtype == "auto" else args.lora_dtype,
                                 max_lora_rank=max_lora_rank, max_loras=min(P, 8), prefix_caching=False)
            try:
                info_b = eng.start()
                figures["one_at_a_time_dtype"] = info_b["dtype"]
                for m, (task, items, reqs) in cases.items():
                    f = figures["modes"][m]
                    eng.answer([(None, None, reqs[: min(4, len(reqs))])], mode="lora")  # warm-up
                    if not args.skip_one_at_a_time:
                        t_load, outs_b = 0.0, []
                        t0 = time.perf_counter()
                        for i, s in enumerate(sources):
                            t1 = time.perf_counter()
                            d = _export([s], tempfile.mkdtemp(prefix=f"one{i}-", dir=scratch))[0]  # save
                            t_load += time.perf_counter() - t1
                            res, timing = eng.answer([(d, None, reqs)], mode="lora")  # load, score, unload
                            t_load += timing.get("lora_load_s", 0.0)
                            outs_b.append(res[0])
                            shutil.rmtree(os.path.dirname(d), ignore_errors=True)
                            print(f"  [{m}] one at a time: adapter {i + 1}/{P} done", flush=True)
                        wall = time.perf_counter() - t0
                        f.update(one_at_a_time=P * len(reqs) / wall, one_at_a_time_export_load_share=t_load / wall)
                        f["ours_vs_one_max_abs_logprob_diff"] = max(
                            _maxdiff(a, b)[0] for a, b in zip(outs_a[m], outs_b))
                        f["ours_vs_one_same_prediction"] = statistics.mean(
                            _agreement(task, items, a, b) for a, b in zip(outs_a[m], outs_b))
                    if args.all_in_flight:
                        dirs = _export(sources, tempfile.mkdtemp(prefix="flight-", dir=scratch))
                        t0 = time.perf_counter()
                        eng.answer([(d, None, reqs) for d in dirs], mode="lora")
                        f["all_in_flight"] = P * len(reqs) / (time.perf_counter() - t0)
            finally:
                eng.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    lines = []
    for m, f in figures["modes"].items():
        one = f.get("one_at_a_time", float("nan"))
        print(f"[{m}] (a) ours [{figures['ours_mode']}, {figures['ours_dtype']}]: {f['ours']:.2f} samples/s "
              f"(export+load {100 * f['ours_export_load_share']:.1f}% of wall time; export {f['ours_export_s']:.2f}s "
              f"for {P} adapters, load {f['ours_load_s_per_adapter']:.3f}s per adapter)")
        if "other_swap" in f:
            print(f"[{m}]     {f['other_dtype']} swap: {f['other_swap']:.2f} samples/s; {figures['ours_dtype']} vs "
                  f"{f['other_dtype']}: same prediction on {100 * f['other_swap_same_prediction']:.1f}% of samples, "
                  f"max |Δ logprob| {f['other_swap_max_abs_logprob_diff']:.3f}")
        if "one_at_a_time" in f:
            print(f"[{m}] (b) one at a time [lora, {figures['one_at_a_time_dtype']}]: {one:.2f} samples/s "
                  f"(save+load {100 * f['one_at_a_time_export_load_share']:.1f}% of wall time); vs ours: max |Δ "
                  f"logprob| {f['ours_vs_one_max_abs_logprob_diff']:.2e}, same prediction on "
                  f"{100 * f['ours_vs_one_same_prediction']:.1f}% of samples")
        if "all_in_flight" in f:
            print(f"[{m}]     all {P} in flight [lora]: {f['all_in_flight']:.2f} samples/s")
        if "base_native" in f:
            print(f"[{m}] (c) base model: {f['base_ours_dtype']:.2f} samples/s in {figures['ours_dtype']}, "
                  f"{f['base_native']:.2f} samples/s in {f['base_native_dtype']}; ceiling = {f['base']:.2f}")
        else:
            print(f"[{m}] (c) base model [{figures['ours_dtype']}]: {f['base']:.2f} samples/s")
        f["ratio"] = f["ours"] / f["base"]
        print(f"[{m}] ratios: ours/base = {f['ratio']:.2f}" + (f", ours/one_at_a_time = {f['ours'] / one:.1f}x"
                                                               if one == one else ""))
        lines.append(f"score-throughput: mode={m} ours={f['ours']:.3f} base={f['base']:.3f} ratio={f['ratio']:.3f} "
                     f"one_at_a_time={one:.3f}")
    print(f"(engine start {figures['startup_s']:.0f}s)")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(figures, fh, indent=2)
    for line in lines:
        print(line)
    return 0
