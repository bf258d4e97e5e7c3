"""Measure an expert pool against the base model on each expert's own task (docs/EXPERTS.md): a dev screen of
candidate sources (kept when the dev gain exceeds 2 paired SE), then the held-out test report of the kept ones.
`loglik` scoring, each task's fitness metric, base and expert on the same items, one managed vLLM engine (the
`genome eval` path). One JSON line per (split, expert) on stdout and in --out.

    python -m scripts.measure_experts POOL_DIR --kept commonsense_qa truthfulqa boolq \\
        --candidates hellaswag winogrande medmcqa openbookqa [--n 200] [--out experts.jsonl]
"""
from __future__ import annotations

import argparse
import json
import math
import time

from evaluators.backends import make_evaluator
from evaluators.tasks import get_task
from genome_jax.model_store import default_model_path


def paired(base: list[float], expert: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-item difference expert - base (n >= 2)."""
    d = [e - b for b, e in zip(base, expert)]
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pool", help="folder of expert adapters named after their tasks")
    p.add_argument("--kept", nargs="*", default=[], help="sources already chosen (no dev screen)")
    p.add_argument("--candidates", nargs="*", default=[], help="sources screened on dev first")
    p.add_argument("--n", type=int, default=200, help="first N items of each split")
    p.add_argument("--model_path", default=None)
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    args = p.parse_args(argv)

    model = args.model_path or str(default_model_path())
    ev = make_evaluator(model, progress=False)

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

    kept = list(args.kept)
    try:
        for name in args.candidates:
            r = row(name, "dev")
            if r["gain"] > 2 * r["paired_se"]:
                kept.append(name)
        for name in kept:
            row(name, "test")
    finally:
        ev.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
