"""Measure the dev-split choices behind `loglik` (docs/TASKS.md): loglik (acc, acc_norm) vs choice_logprob per
multiple-choice task, and plain text vs chat template for loglik contexts. Base model, managed vLLM worker (the
`genome eval` path), one engine for everything; results are written to --out after each step.

    python -m scripts.measure_loglik [--model_path M] [--n 100] [--out loglik_dev.json]
"""
from __future__ import annotations

import argparse
import json
import time

from evaluators.backends import make_evaluator
from evaluators.tasks import get_task
from genome_jax.model_store import default_model_path

MC_TASKS = ("mmlu", "arc_c", "medmcqa", "truthfulqa", "hellaswag", "arc_e", "piqa", "openbookqa", "boolq",
            "commonsense_qa")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=None)
    p.add_argument("--n", type=int, default=100, help="first N dev items per task")
    p.add_argument("--chat_tasks", nargs="+", default=["arc_e", "piqa"])
    p.add_argument("--tasks", nargs="+", default=list(MC_TASKS) + ["winogrande"])
    p.add_argument("--out", default="loglik_dev.json")
    args = p.parse_args(argv)

    model = args.model_path or str(default_model_path())
    res: dict = {}
    ev = make_evaluator(model)

    def run(label: str, tasks: list) -> None:
        t0 = time.perf_counter()
        r = ev.evaluate([None], tasks, "dev", args.n)[0]
        res[label] = {k: dict(v.metrics, score=v.score, n=v.n) for k, v in r.tasks.items()}
        res[label]["wall_s"] = round(time.perf_counter() - t0, 1)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(label, json.dumps(res[label]), flush=True)

    try:
        run("choice_logprob", [get_task(t, formatter=model, mode="choice_logprob") for t in args.tasks
                               if t != "winogrande"])
        for chat in (False, True):
            run(f"loglik chat={chat}", [get_task(t, formatter=model, mode="loglik", loglik_chat=chat)
                                        for t in args.chat_tasks])
        for t in args.tasks:
            if t not in args.chat_tasks:
                run(f"loglik {t}", [get_task(t, formatter=model, mode="loglik")])
    finally:
        ev.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
