"""`genome demo`: the one-command end-to-end demo on SmolLM2-135M-Instruct, on this machine.

    fetch the model (cached) -> train or reuse 4 LoRA experts (cached) -> start the vLLM evaluator
    -> GENOME+ for a few generations on the target task (dev split, choice_logprob)
    -> table on the test split: best initial expert vs evolved best vs top-k ensembles, and where the time went.

Everything it writes goes to one run folder (default runs/demo-<time>; re-running with --output_dir resumes it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from scripts.run_cmd import _exit_1_error

    parser.error = _exit_1_error  # type: ignore[method-assign]
    parser.add_argument("--output_dir", default=None, help="run folder (default runs/demo-<date-time>)")
    parser.add_argument("--target", default=None, help="target task (default: the expert pool's, arc_c)")
    parser.add_argument("--generations", type=int, default=3, help="GENOME+ generations (default 3)")
    parser.add_argument("--population_size", type=int, default=4,
                        help="initial population: the experts themselves, topped up with pairwise merges (default 4)")
    parser.add_argument("--max_population_size", type=int, default=6, help="GENOME+ grows up to this (default 6)")
    parser.add_argument("--n_dev", type=int, default=64, help="dev samples for fitness (default 64)")
    parser.add_argument("--n_test", type=int, default=200, help="test samples for the table (default 200)")
    parser.add_argument("--ensemble_k", type=int, default=3, help="ensembles of the top k = 1..K (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--allow-overlap", "--allow_overlap", dest="allow_overlap", action="store_true",
                        help="run even if an expert was trained on the target's dev/test items (see docs/EXPERTS.md)")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(args: argparse.Namespace) -> int:
    from genome_jax.errors import UserError
    from genome_jax.run_config import load_run_config
    from scripts import run_loop

    for name in ("generations", "population_size", "n_dev", "n_test", "ensemble_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    t0 = time.perf_counter()
    parts: dict[str, float] = {}

    _say("1/4 base model: SmolLM2-135M-Instruct (fetched and converted once, then cached)")
    t = time.perf_counter()
    from genome_jax.model_store import default_model_path

    model_path = default_model_path()
    parts["model"] = time.perf_counter() - t

    _say("2/4 expert pool: 4 LoRA experts trained with optax on other tasks' data (trained once, then cached)")
    t = time.perf_counter()
    from genome_jax.models import trainer

    lora_dir = trainer.ensure_demo_experts(model_path, progress=not args.quiet)
    parts["experts"] = time.perf_counter() - t
    target = args.target or trainer.DEMO_TARGET
    _say(f"    experts in {lora_dir}")

    out_dir = args.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_run_config({
        "tasks": [target], "method": "genome_plus", "model_path": str(model_path), "lora_dir": str(lora_dir),
        "population_size": args.population_size, "max_population_size": args.max_population_size,
        "max_iter": args.generations, "n_dev": args.n_dev, "n_test": args.n_test, "scoring": "choice_logprob",
        "ensemble_k": args.ensemble_k, "seed": args.seed, "output_dir": out_dir, "allow_overlap": args.allow_overlap,
        # the experts themselves start the population (elitism then keeps the evolved best >= the best expert
        # on dev); GENOME's random pairwise merges are `genome run`'s default
        "init_merge": args.population_size < _n_experts(lora_dir),
    })
    cfg, out = run_loop.prepare({k: v for k, v in cfg.to_dict().items() if v is not None})
    _say(f"3/4 GENOME+ on {target}: population {cfg.population_size} -> {cfg.max_population_size}, "
         f"{cfg.max_iter} generation{'s' * (cfg.max_iter != 1)}, fitness = accuracy on {cfg.n_dev} dev samples (choice_logprob), "
         f"vLLM evaluator process; run folder {out}")
    t = time.perf_counter()
    result = run_loop.run(cfg, out, progress=not args.quiet, log=lambda line: print(f"    {line}", flush=True))
    parts["run"] = time.perf_counter() - t
    parts["total"] = time.perf_counter() - t0

    _say(f"4/4 results on the {target} test split ({result['n_test'][target]} samples)")
    print(demo_table(result, target, lora_dir))
    print(timing_lines(result, parts))
    print(f"    files: {out}/result.json, fitness.png, metrics.jsonl, best_adapter/")
    return 0


def _n_experts(lora_dir: Path) -> int:
    from genome_jax.population import adapter_folders

    return len(adapter_folders(lora_dir))


def demo_table(result: dict, target: str, lora_dir: Path) -> str:
    def f(x):
        return "     -" if x is None else f"{100 * x:6.1f}"

    exp = result["best_initial_expert"]
    rows = [("best initial expert" + f" ({exp['name']})", exp.get("dev_fitness"), exp["test_scores"][target]),
            ("GENOME+ evolved best", result["best"]["dev_fitness"], result["best"]["test_scores"][target])]
    for e in result["ensembles"]:
        rows.append((f"ensemble of top {e['k']} (dev-ranked)", None, e["test_scores"][target]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"    {'':{width}}{'dev %':>7}{'test %':>8}"]
    lines += [f"    {name:{width}}{f(dev):>7}{f(test):>8}" for name, dev, test in rows]
    return "\n".join(lines)


def timing_lines(result: dict, parts: dict[str, float]) -> str:
    t = result.get("timings_s", {})
    evo, fin = t.get("evolution", {}), t.get("final", {})
    return (f"    time: model {parts['model']:.1f}s | experts {parts['experts']:.1f}s | "
            f"evaluator start {t.get('evaluator_start', 0.0):.1f}s | "
            f"evolution ({result['generations']} generation{'s' * (result['generations'] != 1)}) "
            f"{evo.get('total', 0.0):.1f}s "
            f"[operators {evo.get('operators', 0.0):.1f}s, export {evo.get('export', 0.0):.1f}s, "
            f"scoring {evo.get('scoring', 0.0):.1f}s, checkpoints {evo.get('checkpoint', 0.0):.1f}s] | "
            f"test split + ensembles {fin.get('total', 0.0):.1f}s | total {parts['total']:.1f}s")


if __name__ == "__main__":
    from scripts.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
