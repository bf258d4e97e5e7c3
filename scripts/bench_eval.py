"""`genome bench eval`: population scoring throughput, three ways, in one run on the same requests.

  (a) ours: the fastest path for the platform (CPU: W+ΔW swapped into a live engine per individual, one batch per
      individual; GPU: multi-LoRA, all individuals in flight), adapters exported to tmpfs first;
  (b) the original GENOME protocol: one adapter at a time through vLLM's LoRA path (save the PEFT folder, load it into
      the engine, score, unload; no fixed sleeps), in the model's own dtype;
  (c) the base model alone on the same P x N requests: the ceiling (the faster of one batch of P x N and P batches
      of N, the shape (a) runs), on (a)'s engine and, when (a) runs float32 for the swap, also on a plain engine
      in the checkpoint's own dtype (bf16 for SmolLM2); the faster of the two is the ceiling.
Prefix caching is off for all three (the same prompts repeat across individuals and would be served from cache).
(a) and (c) run on one engine, interleaved, `--repeats` times (medians); (b) on a LoRA engine afterwards, once.
Only one engine is alive at a time. Ends with one machine-readable line:
    score-throughput: ours=<samples/s> base=<samples/s> one_at_a_time=<samples/s>
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

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
    parser.add_argument("--scoring", default="choice_logprob", choices=("choice_logprob", "generate"))
    parser.add_argument("--n", type=int, default=32, help="samples per adapter (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of (a) and (c) (medians reported)")
    parser.add_argument("--eval_mode", default="auto", choices=("auto", "swap", "lora"), help="path used for (a)")
    parser.add_argument("--dtype", default=None, help="engine dtype for (a)/(c) (default: float32 for swap)")
    parser.add_argument("--lora_dtype", default="auto", help="engine dtype for (b) (default: the model's)")
    parser.add_argument("--skip_one_at_a_time", action="store_true", help="skip (b) (it is slow on CPU)")
    parser.add_argument("--all_in_flight", action="store_true",
                        help="also measure all adapters in flight with multi-LoRA on the (b) engine")
    parser.add_argument("--json_out", default=None, help="also write the figures to this JSON file")


def write_random_adapter(out_dir: str, cfg: dict, rank: int, targets: list[str], seed: int) -> str:
    """A PEFT folder with A ~ N(0, 1/d_in), B ~ N(0, 0.02^2), lora_alpha = rank (scale 1); written atomically."""
    import numpy as np
    from safetensors.numpy import save_file

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
    from evaluators.protocol import ChoiceResponse

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


def run(args: argparse.Namespace) -> int:
    from evaluators.backends.base import scratch_dir
    from evaluators.backends.managed import ManagedBackend
    from evaluators.backends.peft_folder import adapter_info, content_hash
    from evaluators.errors import UserError
    from evaluators.tasks import get_task

    if args.model_path is None:
        from genome_jax.model_store import default_model_path

        args.model_path = str(default_model_path())
    model = os.path.expanduser(args.model_path)
    with open(os.path.join(model, "config.json")) as f:
        mcfg = json.load(f)
    task = get_task(args.task, formatter=model, mode=args.scoring)
    items = task.load("dev", args.n)
    reqs = task.build_requests(items, task.mode)
    n = len(reqs)

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
        total = P * n
        print(f"bench eval: P={P} adapters (rank {max_rank}), n={n} {task.name} dev samples each "
              f"({task.mode}); {total} samples per protocol; tmpfs: {scratch}", flush=True)
        figures: dict = {"P": P, "n": n, "task": task.name, "mode": task.mode, "rank": max_rank}

        # ---- (a) ours + (c) base, one engine, interleaved repeats -------------------------------------------------
        eng = ManagedBackend(model, mode=args.eval_mode, dtype=args.dtype, max_lora_rank=max_lora_rank,
                             max_loras=min(P, 8), prefix_caching=False)
        try:
            t0 = time.perf_counter()
            info = eng.start()
            figures["startup_s"] = time.perf_counter() - t0
            eng.answer([(None, None, reqs[: min(4, n)])])  # warm-up
            ours, base, share, exp_s, load_s, base_shapes = [], [], [], [], [], []
            outs_a = None
            for rep in range(args.repeats):
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
                outs_a = res
                print(f"  repeat {rep + 1}/{args.repeats}: ours {ours[-1]:.2f} samples/s, base {base[-1]:.2f} "
                      f"samples/s (one batch {one_batch:.2f}, {P} batches {per_ind:.2f}), export+load {100 * share[-1]:.1f}% of ours' wall time (export {t_exp:.2f}s "
                      f"for {P}, load {t_load / P:.3f}s per adapter)", flush=True)
        finally:
            eng.close()
        figures.update(ours_mode=info["mode"], ours_dtype=info["dtype"], ours=statistics.median(ours),
                       base=statistics.median(base), ours_export_load_share=statistics.median(share),
                       ours_runs=ours, base_runs=base, base_one_batch_vs_per_individual=base_shapes,
                       ours_export_s=statistics.median(exp_s),
                       ours_load_s_per_adapter=statistics.median(load_s))

        # ---- (c') the base model in the checkpoint's own dtype on a plain engine, if (a) runs another dtype ---------
        native = str(mcfg.get("dtype") or mcfg.get("torch_dtype") or "")
        if native and native != figures["ours_dtype"]:
            eng = ManagedBackend(model, mode="swap", dtype=native, prefix_caching=False)
            try:
                eng.start()
                eng.answer([(None, None, reqs[: min(4, n)])])  # warm-up
                runs = []
                for rep in range(args.repeats):
                    runs.append(max(_base_rates(eng, reqs, P)))
                    print(f"  base in {native}: repeat {rep + 1}/{args.repeats}: {runs[-1]:.2f} samples/s", flush=True)
            finally:
                eng.close()
            figures.update(base_native_dtype=native, base_native=statistics.median(runs), base_native_runs=runs,
                           base_ours_dtype=figures["base"])
            figures["base"] = max(figures["base"], figures["base_native"])  # the ceiling is the faster one

        # ---- (b) one adapter at a time through the LoRA path --------------------------------------------------------
        one = float("nan")
        if not args.skip_one_at_a_time or args.all_in_flight:
            eng = ManagedBackend(model, mode="lora", dtype=None if args.lora_dtype == "auto" else args.lora_dtype,
                                 max_lora_rank=max_lora_rank, max_loras=min(P, 8), prefix_caching=False)
            try:
                info_b = eng.start()
                eng.answer([(None, None, reqs[: min(4, n)])], mode="lora")  # warm-up
                figures["one_at_a_time_dtype"] = info_b["dtype"]
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
                        print(f"  one at a time: adapter {i + 1}/{P} done", flush=True)
                    wall = time.perf_counter() - t0
                    one = total / wall
                    figures.update(one_at_a_time=one, one_at_a_time_export_load_share=t_load / wall)
                    diffs = [_maxdiff(a, b) for a, b in zip(outs_a, outs_b)]
                    figures["ours_vs_one_max_abs_logprob_diff"] = max(d[0] for d in diffs)
                    figures["ours_vs_one_same_prediction"] = statistics.mean(d[1] for d in diffs)
                if args.all_in_flight:
                    dirs = _export(sources, tempfile.mkdtemp(prefix="flight-", dir=scratch))
                    t0 = time.perf_counter()
                    eng.answer([(d, None, reqs) for d in dirs], mode="lora")
                    figures["all_in_flight"] = total / (time.perf_counter() - t0)
            finally:
                eng.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    f = figures
    print(f"(a) ours [{f['ours_mode']}, {f['ours_dtype']}]: {f['ours']:.2f} samples/s "
          f"(export+load {100 * f['ours_export_load_share']:.1f}% of wall time; export {f['ours_export_s']:.2f}s "
          f"for {P} adapters, load {f['ours_load_s_per_adapter']:.3f}s per adapter)")
    if "one_at_a_time" in f:
        print(f"(b) one at a time [lora, {f['one_at_a_time_dtype']}]: {f['one_at_a_time']:.2f} samples/s "
              f"(save+load {100 * f['one_at_a_time_export_load_share']:.1f}% of wall time)")
        print(f"    ours vs one-at-a-time: max |Δ logprob| {f['ours_vs_one_max_abs_logprob_diff']:.2e}, "
              f"same prediction on {100 * f['ours_vs_one_same_prediction']:.1f}% of samples")
    if "all_in_flight" in f:
        print(f"    all {P} in flight [lora]: {f['all_in_flight']:.2f} samples/s")
    if "base_native" in f:
        print(f"(c) base model: {f['base_ours_dtype']:.2f} samples/s in {f['ours_dtype']}, {f['base_native']:.2f} "
              f"samples/s in {f['base_native_dtype']}; ceiling = {f['base']:.2f} (engine start {f['startup_s']:.0f}s)")
    else:
        print(f"(c) base model [{f['ours_dtype']}]: {f['base']:.2f} samples/s (engine start {f['startup_s']:.0f}s)")
    print(f"ratios: ours/base = {f['ours'] / f['base']:.2f}"
          + (f", ours/one_at_a_time = {f['ours'] / one:.1f}x" if one == one else ""))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(f, fh, indent=2)
    print(f"score-throughput: ours={f['ours']:.3f} base={f['base']:.3f} one_at_a_time={one:.3f}")
    return 0
