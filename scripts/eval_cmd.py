"""`genome eval`: score adapters (or the base model) on tasks and print a JSON object of per-task scores.

    genome eval --model_path M [--adapter DIR ...] --tasks gsm8k mmlu --split dev|test [--n N]
                [--scoring generate|choice_logprob|loglik] [--backend vllm|jax]
                [--endpoints http://host:port ...] [--eval_mode auto|swap|lora]

Without --adapter the base model is scored. --backend vllm (default) scores in a managed vLLM worker (or on
--endpoints, --eval_devices, --ray_address); --backend jax scores choice_logprob / loglik tasks in this process with
the JAX scorer. Both go through the same evaluator (tasks, result cache, JSON below). The scores go to stdout as JSON
(`scores`: each task's fitness score; `metrics`: all of each task's metrics, e.g. acc and acc_norm under loglik);
progress and notes go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from evaluators.backends import make_evaluator
from evaluators.errors import UserError
from evaluators.tasks import CHOICE_LOGPROB, LOGLIK, MULTIPLE_CHOICE, GenerationConfig, get_task, normalize_weights
from genome_jax.model_store import default_model_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default=None,
                        help="base model folder (HF checkpoint); default: the cached SmolLM2-135M-Instruct")
    parser.add_argument("--adapter", nargs="+", default=[], metavar="DIR",
                        help="PEFT adapter folder(s) to score (default: the base model only)")
    parser.add_argument("--base", action="store_true", help="also score the base model when adapters are given")
    parser.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                        help="task names (gsm8k, mmlu, ...) or paths to task .json files")
    parser.add_argument("--split", default="dev", choices=("dev", "test"))
    parser.add_argument("--n", type=int, default=None, help="first N items of the split (default: all)")
    parser.add_argument("--scoring", default=None, choices=("generate", "choice_logprob", "loglik"),
                        help="scoring mode for tasks that offer it (default: each task's own default)")
    parser.add_argument("--task_weights", type=float, nargs="+", default=None,
                        help="weights of the tasks in the fitness (default: equal)")
    parser.add_argument("--data_dir", default=None, help="folder holding <task>.json (default: the shipped copies)")
    parser.add_argument("--max_tokens", type=int, default=None, help="generation length for generate mode")
    parser.add_argument("--backend", default="vllm", choices=("vllm", "jax"),
                        help="vllm: the vLLM evaluator (managed worker, endpoints, devices, Ray); jax: the in-process "
                             "JAX scorer (choice_logprob and loglik tasks only)")
    parser.add_argument("--endpoints", nargs="+", default=None, metavar="URL",
                        help="external OpenAI-compatible vLLM servers instead of the managed local worker")
    parser.add_argument("--eval_mode", default="auto", choices=("auto", "swap", "lora"),
                        help="managed worker: swap = W+ΔW pushed into the engine (CPU default), "
                             "lora = multi-LoRA, all in flight (GPU default)")
    parser.add_argument("--max_lora_rank", type=int, default=16, help="adapters above this rank are refused")
    parser.add_argument("--max_loras", type=int, default=8, help="LoRA slots of the engine (lora mode)")
    parser.add_argument("--dtype", default=None,
                        help="engine dtype (vllm default: the model's, bf16 for SmolLM2; float32 for exactness checks; "
                             "jax default: float32)")
    parser.add_argument("--cache_dir", default=None, help="persist the result cache here (default: memory only)")
    parser.add_argument("--details", action="store_true", help="include per-sample predictions in the JSON")
    parser.add_argument("--eval_devices", default=None, metavar="0,1,2,3",
                        help="one managed vLLM worker per listed GPU (CUDA_VISIBLE_DEVICES each); docs/SCALING.md")
    parser.add_argument("--ray_address", default=None, metavar="ADDR",
                        help="score on a Ray cluster, one vLLM engine per actor: local | auto | ray://head:10001")
    parser.add_argument("--ray_actors", type=int, default=None,
                        help="engines on the Ray cluster (default: one per GPU, or per CPU without GPUs)")


def _tasks(args, model_path: str) -> list:
    gen = GenerationConfig(max_tokens=args.max_tokens) if args.max_tokens else None
    out = []
    for name in args.tasks:
        task = get_task(name, data_dir=args.data_dir, formatter=model_path, generation=gen)
        if args.scoring and args.scoring != task.mode:
            if args.scoring in task.modes or task.kind == MULTIPLE_CHOICE:  # a multiple-choice task refuses a mode
                task = get_task(name, data_dir=args.data_dir, formatter=model_path, generation=gen, mode=args.scoring)
            else:
                sys.stderr.write(f"genome: note: task '{task.name}' has no {args.scoring} mode; using {task.mode}\n")
        out.append(task)
    return out


def _check_jax_args(args, tasks) -> None:
    """--backend jax: only choice tasks, and none of the vLLM-only options (checked before anything loads)."""
    given = {"--endpoints": args.endpoints, "--eval_devices": args.eval_devices, "--ray_address": args.ray_address,
             "--eval_mode": args.eval_mode != "auto"}
    vllm_only = [flag for flag, value in given.items() if value]
    if vllm_only:
        raise UserError(f"{vllm_only[0]} needs --backend vllm")
    if args.dtype not in (None, "float32", "bfloat16"):
        raise UserError(f"--dtype {args.dtype} with --backend jax: float32 or bfloat16")
    for t in tasks:
        if t.mode not in (CHOICE_LOGPROB, LOGLIK):
            raise UserError(f"--backend jax scores choice_logprob and loglik tasks only; task '{t.name}' uses "
                            f"'{t.mode}'")


def _evaluator(args, model_path: str):
    if args.backend == "jax":
        from scripts.scoring import jax_evaluator  # imports JAX (4.6 s measured): only --backend jax needs it

        return jax_evaluator(model_path, cache_dir=args.cache_dir, progress=True, dtype=args.dtype or "float32")
    kwargs = {} if args.endpoints else {"dtype": args.dtype}
    if args.eval_devices is not None:
        kwargs["eval_devices"] = args.eval_devices
    if args.ray_address is not None:
        kwargs.update(ray_address=args.ray_address, ray_actors=args.ray_actors)
    return make_evaluator(model_path, endpoints=args.endpoints, eval_mode=args.eval_mode,
                          max_lora_rank=args.max_lora_rank, max_loras=args.max_loras, cache_dir=args.cache_dir,
                          progress=True, **kwargs)


def run(args: argparse.Namespace) -> int:
    if args.model_path is None:
        args.model_path = str(default_model_path())
    model_path = os.path.expanduser(args.model_path)
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    tasks = _tasks(args, model_path)
    if args.backend == "jax":
        _check_jax_args(args, tasks)
    for t in tasks:  # bad items (e.g. no `choices` under loglik) are refused before the engine starts
        t.build_requests(t.load(args.split, args.n), t.mode)
    weights, note = normalize_weights(args.task_weights, len(tasks), [t.name for t in tasks])
    if note:
        sys.stderr.write(f"genome: note: {note}\n")
    adapters: list[str | None] = list(args.adapter) or [None]
    if args.adapter and args.base:
        adapters = [None] + adapters
    ev = _evaluator(args, model_path)
    try:
        ev.check_adapters(adapters)  # bad folders / ranks fail before the engine starts
        results = ev.evaluate(adapters, tasks, args.split, args.n)
        info = ev.backend.start() or {}  # started by now: the engine's route and dtype
        if isinstance(info, list):  # several engines (eval_devices, Ray): they share one configuration
            info = info[0] if info else {}
    finally:
        ev.close()
    out = {
        "model_path": model_path,
        "split": args.split,
        "n": args.n,
        "backend": ev.backend.kind,
        "eval_mode": info.get("mode", "lora" if args.endpoints else args.eval_mode),
        "dtype": info.get("dtype"),
        "modes": {t.name: t.mode for t in tasks},
        "scores": {},
        "metrics": {},
        "fitness": {},
    }
    for r in results:
        name = "base" if r.adapter is None else r.adapter
        out["scores"][name] = r.scores
        out["metrics"][name] = {k: v.metrics for k, v in r.tasks.items()}  # loglik: acc and acc_norm
        out["fitness"][name] = r.fitness(weights)
        if args.details:
            out.setdefault("details", {})[name] = {k: v.to_json() for k, v in r.tasks.items()}
    print(json.dumps(out, indent=2))
    return 0
