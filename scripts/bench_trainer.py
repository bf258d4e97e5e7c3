"""`genome bench trainer`: tokens/s of the optax LoRA train step (genome_jax.models.trainer.train_step) next to a
PyTorch + PEFT train step of the same shape, measured in the same run on the same packed batches.

Same work on both sides: SmolLM2 in the same compute dtype (--dtype; bfloat16 = JAX bf16 base weights vs torch
autocast bf16; LoRA factors and AdamW state float32 on both), LoRA rank r on the same target modules (scale
alpha/r), forward over R rows x T tokens, the output projection and cross-entropy only at the answer positions,
AdamW on the LoRA factors.
The JAX step also applies the packed-segment mask (torch gets plain causal attention: a little less work).
Steps alternate JAX / torch so load changes on a shared machine hit both; medians are reported.
Torch is timed at each --threads count and the fastest is the baseline.
Ends with one line: `trainer-throughput: jax=<tokens/s> torch=<tokens/s> ratio=<jax/torch> (...)`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

from evaluators.tasks import get_task
from genome_jax.model_store import default_model_path
from genome_jax.models import llama, trainer
from genome_jax.models.trainer import DEMO_CONFIG as D


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", default=None)
    p.add_argument("--task", default="mmlu", help="task whose training examples fill the batches")
    p.add_argument("--rank", type=int, default=D.rank)
    p.add_argument("--batch_rows", type=int, default=D.batch_rows)
    p.add_argument("--seq_len", type=int, default=D.seq_len)
    p.add_argument("--targets", nargs="+", default=list(D.targets))
    p.add_argument("--reps", type=int, default=5, help="timed steps per side (after 1 warm-up step each)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch intra-op thread counts to time (default: 1 and torch's own default); the faster one "
                        "is the baseline (on a loaded machine torch's spinning OpenMP threads can lose to 1 thread)")
    p.add_argument("--dtype", default=D.dtype, choices=("float32", "bfloat16"),
                   help="compute dtype of both sides (bfloat16: JAX bf16 base weights, torch autocast bf16; the "
                        "LoRA factors and optimizer state stay float32 on both)")


def run(args: argparse.Namespace) -> int:
    import torch  # heavy (torch, peft, transformers): the PEFT baseline of this benchmark
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = sorted(set(args.threads or [1, torch.get_num_threads()]))
    model_path = args.model_path
    if model_path is None:
        model_path = default_model_path()
    model_path = os.fspath(model_path)
    cfg = trainer.TrainConfig(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(args.targets),
                              steps=args.reps + 2, warmup_steps=1, batch_rows=args.batch_rows, seq_len=args.seq_len,
                              dtype=args.dtype)
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    examples = trainer.task_examples(get_task(args.task, formatter=model_path), "test", tok, max_len=cfg.seq_len)
    batches = trainer.packed_batches(examples, cfg, seed=0)
    data = [next(batches) for _ in range(args.reps + 1)]

    # JAX
    config, params = llama.load_params(model_path, dtype=jax.numpy.dtype(cfg.dtype))
    lora = trainer.init_lora(jax.random.key(0), config, cfg)
    opt_state = trainer.make_optimizer(cfg).init(lora)

    def jax_step(b):
        nonlocal lora, opt_state
        lora, opt_state, loss = trainer.train_step(lora, opt_state, params, trainer._device_batch(b),
                                                   config=config, cfg=cfg)
        return float(loss)

    # PyTorch + PEFT
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
    pm = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
                                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    pm.train()
    inner = pm.base_model.model  # LlamaForCausalLM with LoRA layers injected
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    def torch_step(b):
        w = b.tgt_w > 0
        rows, pos, tgt = (torch.from_numpy(x[w].astype(np.int64)) for x in (b.tgt_row, b.tgt_pos, b.tgt_tok))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            h = inner.model(input_ids=torch.from_numpy(b.tokens.astype(np.int64)),
                            position_ids=torch.from_numpy(b.positions.astype(np.int64))).last_hidden_state
            logits = inner.lm_head(h[rows, pos])
        loss = torch.nn.functional.cross_entropy(logits.float(), tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in pm.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    tokens = cfg.batch_rows * cfg.seq_len  # both sides process every position of every row
    print(f"shape: {cfg.batch_rows} rows x {cfg.seq_len} tokens, {cfg.dtype}, LoRA r={cfg.rank} on "
          f"{','.join(cfg.targets)}, {args.reps} timed steps per side; torch threads {threads}, jax devices "
          f"{jax.devices()}", file=sys.stderr)
    t0 = time.perf_counter()
    jax_step(data[0])
    print(f"jax warm-up (compile) step: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for n in threads:
        torch.set_num_threads(n)
        torch_step(data[0])
    tj, tt = [], {n: [] for n in threads}
    for b in data[1:]:
        t0 = time.perf_counter()
        jax_step(b)
        tj.append(time.perf_counter() - t0)
        for n in threads:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            torch_step(b)
            tt[n].append(time.perf_counter() - t0)
        print(f"  step: jax {tj[-1]:.2f}s  " + "  ".join(f"torch[{n} thr] {tt[n][-1]:.2f}s" for n in threads),
              file=sys.stderr, flush=True)
    jx = tokens / statistics.median(tj)
    th_all = {n: tokens / statistics.median(v) for n, v in tt.items()}
    best = max(th_all, key=th_all.get)
    th = th_all[best]
    real = statistics.mean(int((b.segments > 0).sum()) for b in data[1:]) / tokens
    print(f"median step: jax {statistics.median(tj):.2f}s; torch+peft " +
          ", ".join(f"{statistics.median(v):.2f}s with {n} thread(s)" for n, v in tt.items()) +
          f" ({real:.0%} of the row positions are real tokens, the rest padding)")
    print(f"trainer-throughput: jax={jx:.1f} torch={th:.1f} ratio={jx / th:.2f} (tokens/s; torch with {best} "
          f"thread(s), {cfg.dtype})")
    return 0
