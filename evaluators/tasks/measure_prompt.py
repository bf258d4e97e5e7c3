"""Measure which choice_logprob prompt suits a model better: plain text or the chat template.

    python -m evaluators.tasks.measure_prompt [--model_path M] [--tasks mmlu arc_c] [--n 50]

Scores the first n dev items of each task both ways with the transformers reference (fp32) and prints accuracies.
The result chose MultipleChoiceTask.logprob_chat (see docs/TASKS.md).
"""
from __future__ import annotations

import argparse
import os
import time

from evaluators.reference import answer_with_transformers, load_reference_model
from evaluators.tasks import get_task


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=os.path.expanduser("~/.cache/genome-jax/models/smollm2-135m"))
    p.add_argument("--tasks", nargs="+", default=["mmlu", "arc_c"])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--variants", nargs="+", choices=["plain", "chat"], default=["plain", "chat"])
    args = p.parse_args(argv)

    loaded = load_reference_model(args.model_path)
    for name in args.tasks:
        for chat in [v == "chat" for v in args.variants]:
            task = get_task(name, formatter=args.model_path, logprob_chat=chat)
            items = task.load("dev", args.n)
            t0 = time.perf_counter()
            res = task.score(items, answer_with_transformers(args.model_path, task.build_requests(items), _loaded=loaded))
            mean_p_gold = sum(ps[lab.index(g)] for ps, lab, g in zip(res.option_probs, res.options, res.references)) / res.n
            print(f"{name:8s} chat={str(chat):5s} n={res.n} accuracy={res.score:.3f} mean_p(gold)={mean_p_gold:.3f} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
