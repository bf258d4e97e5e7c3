"""`genome train-experts`: fine-tune one LoRA expert per task file with optax (wiring only; the math lives in
genome_jax.models.trainer).

    genome train-experts --model_path M --out DIR --experts mmlu=mmlu medmcqa=path/to/medmcqa.json:test \\
        --rank 8 --steps 30 --lr 2e-3

writes DIR/<name>/ (PEFT folders that peft and vLLM load) and DIR/train_log.json (config, loss curve per expert,
tokens/s, and with --eval_n the held-out accuracy of each expert next to the base model's).
`genome train-experts --demo [--eval_n N]` builds (or reuses) the demo's cached pool and prints its folder (with
--eval_n, a JSON report of each expert's held-out accuracy next to the base model's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from genome_jax import stopping


def add_arguments(p: argparse.ArgumentParser) -> None:
    from genome_jax.models.trainer import DEMO_CONFIG as D

    p.add_argument("--model_path", default=None, help="HF Llama folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--out", default=None, help="output folder for the adapters (required unless --demo)")
    p.add_argument("--experts", nargs="+", default=None, metavar="NAME=TASK[:split]",
                   help="one expert per entry: a registered task name or a task .json file; split dev|test "
                        "(default test)")
    p.add_argument("--demo", action="store_true", help="build or reuse the demo's cached expert pool, print its path")
    p.add_argument("--rank", type=int, default=D.rank)
    p.add_argument("--alpha", type=float, default=D.alpha, help="LoRA alpha while training (scale alpha/rank)")
    p.add_argument("--targets", nargs="+", default=list(D.targets), help="target modules (short names)")
    p.add_argument("--steps", type=int, default=D.steps)
    p.add_argument("--lr", type=float, default=D.lr, help="peak learning rate (warmup then cosine)")
    p.add_argument("--warmup_steps", type=int, default=D.warmup_steps)
    p.add_argument("--weight_decay", type=float, default=D.weight_decay)
    p.add_argument("--batch_rows", type=int, default=D.batch_rows, help="packed rows per step")
    p.add_argument("--seq_len", type=int, default=D.seq_len, help="tokens per packed row (longer examples skipped)")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--remat", action="store_true", help="recompute layers in the backward pass (less memory)")
    p.add_argument("--eval_n", type=int, default=0,
                   help="score each expert and the base model on N held-out items of its task (choice_logprob)")
    p.add_argument("--no_progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    # SIGTERM/SIGINT: stop cleanly with one line; the pool is written at the end, so a re-run redoes it whole
    with stopping.graceful_stop(lambda: "before the experts were written"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from genome_jax.errors import UserError
    from genome_jax.models import trainer

    model_path = args.model_path
    if model_path is None:
        from genome_jax.model_store import default_model_path

        model_path = default_model_path()
    model_path = os.path.expanduser(os.fspath(model_path))
    if not os.path.isdir(model_path):
        raise UserError(f"--model_path {model_path}: not a folder")
    if args.eval_n < 0:
        raise UserError(f"--eval_n must be >= 0, got {args.eval_n}")
    if args.demo:
        path = trainer.ensure_demo_experts(model_path, progress=not args.no_progress)
        if args.eval_n:
            ev = trainer.evaluate_pool(model_path, path, trainer.DEMO_EXPERTS, args.eval_n)
            print(json.dumps({"pool": str(path), "eval": ev}, indent=2))
        else:
            print(path)
        return 0
    if not args.out:
        raise UserError("--out is required (or use --demo)")
    if not args.experts:
        raise UserError("--experts is required: NAME=TASK[:split] ...")
    specs = [trainer.ExpertSpec.parse(e) for e in args.experts]
    out = Path(args.out).expanduser()
    clash = [s.name for s in specs if (out / s.name).exists() and not (out / s.name / "adapter_config.json").exists()]
    if clash:
        raise UserError(f"{out}: {clash[0]} exists and is not an adapter folder; refusing to overwrite it")
    cfg = trainer.TrainConfig(
        rank=args.rank, alpha=args.alpha, targets=tuple(args.targets), steps=args.steps, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, batch_rows=args.batch_rows,
        seq_len=args.seq_len, seed=args.seed, remat=args.remat)
    result = trainer.train_pool(model_path, specs, out, cfg, eval_n=args.eval_n, progress=not args.no_progress,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    summary = {"out": str(out), "experts": [{k: e[k] for k in ("name", "task", "split", "examples", "tokens",
                                                               "seconds")} | {"final_loss": e["losses"][-1]}
                                            for e in result["experts"]]}
    if "eval" in result:
        summary["eval"] = result["eval"]
    print(json.dumps(summary, indent=2))
    return 0
