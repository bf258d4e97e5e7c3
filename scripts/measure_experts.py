"""Measure an expert pool against the base model on each expert's own task (docs/EXPERTS.md): a dev screen of
candidate sources (kept when the dev gain exceeds 2 paired SE), then the held-out test report of the kept ones.
`loglik` scoring, each task's fitness metric, base and expert on the same items, one managed vLLM engine (the
`genome eval` path). One JSON line per (split, expert) on stdout and in --out.

    python -m scripts.measure_experts POOL_DIR --kept commonsense_qa truthfulqa boolq \\
        --candidates hellaswag winogrande medmcqa openbookqa [--n 200] [--out experts.jsonl]

`--screen_only` scores the candidates on dev and reads no test item: for comparing several recipes on dev, so
that test is read once, for the recipe chosen.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from evaluators.backends import make_evaluator
from evaluators.backends.peft_folder import adapter_info
from evaluators.errors import UserError
from evaluators.tasks import get_task
from genome_jax.model_store import default_model_path
from scripts.scoring import max_lora_rank


def paired(base: list[float], expert: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-item difference expert - base (n >= 2)."""
    d = [e - b for b, e in zip(base, expert)]
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))


def held_out_reads(kept: list[str], screened: list[dict], screen_only: bool) -> list[str]:
    """The experts whose held-out test items are read: the kept ones, then each screened candidate whose dev gain
    exceeds 2 paired SE, each once; none under screen_only."""
    if screen_only:
        return []
    names = list(kept) + [r["expert"] for r in screened if r["gain"] > 2 * r["paired_se"]]
    return list(dict.fromkeys(names))


def pool_max_rank(pool: str, names: list[str]) -> int:
    """vLLM's max_lora_rank for the named adapters of the pool: the next size it supports above their largest rank,
    at least 16, so that a pool of higher-rank adapters is measured as it is. A bad folder is a UserError naming it."""
    return max_lora_rank(max((adapter_info(f"{pool}/{name}").rank for name in names), default=0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pool", help="folder of expert adapters named after their tasks")
    p.add_argument("--kept", nargs="*", default=[], help="sources already chosen (no dev screen)")
    p.add_argument("--candidates", nargs="*", default=[], help="sources screened on dev first")
    p.add_argument("--n", type=int, default=200, help="first N items of each split")
    p.add_argument("--model_path", default=None)
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    p.add_argument("--screen_only", action="store_true", help="dev screen of the candidates only; read no test item")
    args = p.parse_args(argv)

    if args.screen_only and args.kept:
        p.error("--screen_only reads no test item, so --kept has nothing to do; drop one of them")
    try:
        return _measure(args)
    except UserError as e:
        print(f"measure_experts: error: {e}", file=sys.stderr)
        return 1


def _measure(args: argparse.Namespace) -> int:
    model = args.model_path or str(default_model_path())
    rank = pool_max_rank(args.pool, list(args.kept) + list(args.candidates))
    ev = make_evaluator(model, progress=False, max_lora_rank=rank)

    def row(name: str, split: str) -> dict:
        task = get_task(name, formatter=model, mode="loglik")
        t = time.perf_counter()
        base, exp = ev.evaluate([None, f"{args.pool}/{name}"], [task], split, args.n)
        b, e = base.tasks[name], exp.tasks[name]
        gain, se = paired(b.per_sample, e.per_sample)
        r = {"split": split, "expert": name, "n": len(b.per_sample), "base": b.score, "expert_score": e.score,
             "gain": gain, "paired_se": se, "base_metrics": b.metrics, "expert_metrics": e.metrics,
             "seconds": round(time.perf_counter() - t)}
        line = json.dumps(r)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        return r

    try:
        screened = [row(name, "dev") for name in args.candidates]
        for name in held_out_reads(args.kept, screened, args.screen_only):
            row(name, "test")
    finally:
        ev.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
