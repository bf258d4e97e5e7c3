"""`genome demo`: the one-command end-to-end demo on SmolLM2-135M-Instruct, on this machine.

    fetch the model (cached) -> train or reuse the LoRA expert pool (3 experts; cached; docs/EXPERTS.md) -> start the vLLM evaluator
    -> GENOME+ for a few generations on the target task (arc_e: no expert saw any of its items; dev split, loglik)
    -> table on the test split: base model, uniform merge of the experts, best initial expert, evolved best, top-k
       ensembles, each with the standard error of its accuracy, and whether the evolved best's gain is beyond noise;
       demo.png (test accuracy per row, chance and base model marked); where the time went.

Everything it writes goes to one run folder (default runs/demo-<time>; re-running with --output_dir resumes it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from evaluators.backends.base import make_evaluator
from evaluators.stats import binomial_se
from evaluators.tasks import get_task
from genome_jax import reporting
from genome_jax.errors import UserError
from genome_jax.model_store import default_model_path
from genome_jax.models import trainer
from genome_jax.population import Population, PopulationMeta, adapter_folders, export_adapter, load_population
from genome_jax.run_config import load_run_config
from scripts import run_loop, train_experts
from scripts.cli import main
from scripts.run_cmd import _exit_1_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _exit_1_error  # type: ignore[method-assign]
    parser.add_argument("--output_dir", default=None, help="run folder (default runs/demo-<date-time>)")
    parser.add_argument("--target", default=None, help="target task (default arc_e: no expert trained on any of its items)")
    parser.add_argument("--generations", type=int, default=3, help="GENOME+ generations (default 3)")
    parser.add_argument("--population_size", type=int, default=4,
                        help="initial population: the experts themselves, topped up with pairwise merges (default 4)")
    parser.add_argument("--max_population_size", type=int, default=6, help="GENOME+ grows up to this (default 6)")
    parser.add_argument("--n_dev", type=int, default=64, help="dev samples for fitness (default 64)")
    parser.add_argument("--n_test", type=int, default=200, help="test samples for the table (default 200)")
    parser.add_argument("--ensemble_k", type=int, default=3, help="ensembles of the top k = 1..K (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", choices=("demo", "smoke"), default="demo",
                        help="expert pool (default demo; smoke: 2 barely trained experts, for plumbing tests only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--allow-overlap", "--allow_overlap", dest="allow_overlap", action="store_true",
                        help="run even if an expert was trained on the target's dev/test items (see docs/EXPERTS.md)")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(args: argparse.Namespace) -> int:
    for name in ("generations", "population_size", "n_dev", "n_test", "ensemble_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    t0 = time.perf_counter()
    parts: dict[str, float] = {}

    _say("1/4 base model: SmolLM2-135M-Instruct (fetched and converted once, then cached)")
    t = time.perf_counter()

    model_path = default_model_path()
    parts["model"] = time.perf_counter() - t

    _say(f"2/4 expert pool ({args.pool}): LoRA experts trained with optax on other tasks' data (trained once, then cached)")
    t = time.perf_counter()

    lora_dir = train_experts.ensure_pool(str(model_path), args.pool, progress=not args.quiet)
    parts["experts"] = time.perf_counter() - t
    target = args.target or trainer.DEMO_TARGET
    _say(f"    experts in {lora_dir}")

    out_dir = args.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_run_config({
        "tasks": [target], "method": "genome_plus", "model_path": str(model_path), "lora_dir": str(lora_dir),
        "population_size": args.population_size, "max_population_size": args.max_population_size,
        "max_iter": args.generations, "n_dev": args.n_dev, "n_test": args.n_test, "scoring": "loglik",
        "ensemble_k": args.ensemble_k, "seed": args.seed, "output_dir": out_dir, "allow_overlap": args.allow_overlap,
        # the experts themselves start the population (elitism then keeps the evolved best >= the best expert
        # on dev); GENOME's random pairwise merges are `genome run`'s default
        "init_merge": args.population_size < _n_experts(lora_dir),
    })
    cfg, out = run_loop.prepare({k: v for k, v in cfg.to_dict().items() if v is not None})
    _say(f"3/4 GENOME+ on {target}: population {cfg.population_size} -> {cfg.max_population_size}, "
         f"{cfg.max_iter} generation{'s' * (cfg.max_iter != 1)}, fitness = accuracy on {cfg.n_dev} dev samples (loglik), "
         f"vLLM evaluator process; run folder {out}")
    t = time.perf_counter()
    result = run_loop.run(cfg, out, progress=not args.quiet, log=lambda line: print(f"    {line}", flush=True))
    parts["run"] = time.perf_counter() - t
    t = time.perf_counter()
    result["baselines"] = score_baselines(str(model_path), lora_dir, target, args.n_test, Path(out))
    parts["baselines"] = time.perf_counter() - t
    _write_result(Path(out) / "result.json", result)
    parts["total"] = time.perf_counter() - t0

    _say(f"4/4 results on the {target} test split ({result['n_test'][target]} samples)")
    print(demo_table(result, target, lora_dir))
    print(timing_lines(result, parts))
    plot_rows(result, target, Path(out) / "demo.png")
    print(f"    files: {out}/result.json, demo.png, fitness.png, metrics.jsonl, best_adapter/, uniform_merge/")
    return 0


def _write_result(path: Path, result: dict) -> None:
    """result.json again, now with the baselines (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def uniform_merge(lora_dir: Path, out: Path) -> Path:
    """The experts' uniform linear merge, exact: ΔW = mean_i B_i A_i, written as one adapter of rank E·r
    (A = the A_i stacked, B = the B_i / E side by side)."""
    pop = load_population(adapter_folders(lora_dir))
    e = pop.size
    factors = {m: {"A": np.concatenate(list(np.asarray(ab["A"])), axis=0)[None],
                   "B": np.concatenate(list(np.asarray(ab["B"]) / e), axis=1)[None]} for m, ab in pop.factors.items()}
    meta = PopulationMeta(base_model=pop.meta.base_model, target_modules=pop.meta.target_modules,
                          rank=e * pop.meta.rank, names=("uniform_merge",))
    return export_adapter(Population(factors=factors, meta=meta), 0, out, trim=False)


def score_baselines(model_path: str, lora_dir: Path, target: str, n_test: int, out: Path) -> dict:
    """Test accuracy of the base model and of the uniform merge (same items, same loglik scoring as the run), and
    the target's chance level (mean of 1 / number of options)."""
    merged = uniform_merge(lora_dir, out / "uniform_merge")
    rank = json.loads((merged / "adapter_config.json").read_text())["r"]
    task = get_task(target, formatter=model_path, mode="loglik")
    ev = make_evaluator(model_path, max_lora_rank=rank)
    try:
        base, uni = ev.evaluate([None, str(merged)], [task], "test", n_test)
    finally:
        ev.close()
    items = task.load("test", n_test)
    return {"base": base.tasks[task.name].score, "uniform_merge": uni.tasks[task.name].score,
            "chance": sum(1.0 / len(it["choices"]) for it in items) / len(items), "n": len(items)}


stderr = binomial_se  # standard error of an accuracy measured on n items (binomial)


def _rows(result: dict, target: str) -> list[tuple[str, float | None, float]]:
    exp = result["best_initial_expert"]
    rows = []
    if "baselines" in result:
        rows += [("base model (no adapter)", None, result["baselines"]["base"]),
                 ("uniform merge of the experts", None, result["baselines"]["uniform_merge"])]
    rows += [("best initial expert" + f" ({exp['name']})", exp.get("dev_fitness"), exp["test_scores"][target]),
             ("GENOME+ evolved best", result["best"]["dev_fitness"], result["best"]["test_scores"][target])]
    for e in result["ensembles"]:
        rows.append((f"ensemble of top {e['k']} (dev-ranked)", None, e["test_scores"][target]))
    return rows


def verdict(result: dict, target: str) -> str:
    """Is the evolved best's test gain over the best initial expert (and the base model) beyond noise? Beyond noise
    = more than two standard errors of the difference of two independent accuracies (sqrt(se1^2 + se2^2); the
    paired error is smaller, so this errs towards "within noise")."""
    n = result["n_test"][target]
    best = result["best"]["test_scores"][target]
    refs = [("the best initial expert", result["best_initial_expert"]["test_scores"][target])]
    if "baselines" in result:
        refs += [("the base model", result["baselines"]["base"]), ("the uniform merge", result["baselines"]["uniform_merge"])]
    parts = []
    for name, ref in refs:
        d = best - ref
        se = math.hypot(stderr(best, n), stderr(ref, n))
        parts.append(f"{100 * d:+.1f} points vs {name} ({'beyond' if abs(d) > 2 * se else 'within'} noise: "
                     f"2 SE = {200 * se:.1f})")
    return "    evolved best: " + "; ".join(parts)


def _n_experts(lora_dir: Path) -> int:
    return len(adapter_folders(lora_dir))


def demo_table(result: dict, target: str, lora_dir: Path | None) -> str:
    """Rows (dev %, test %, standard error of the test accuracy in points), then the chance level and the verdict."""
    def f(x):
        return "     -" if x is None else f"{100 * x:6.1f}"

    n = result["n_test"][target]
    rows = _rows(result, target)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"    {'':{width}}{'dev %':>7}{'test %':>8}{'± SE':>7}"]
    lines += [f"    {name:{width}}{f(dev):>7}{f(test):>8}{100 * stderr(test, n):>7.1f}" for name, dev, test in rows]
    if "baselines" in result:
        lines.append(f"    chance level {100 * result['baselines']['chance']:.1f}%; {n} test items")
    lines.append(verdict(result, target))
    return "\n".join(lines)


def plot_rows(result: dict, target: str, path: Path) -> None:
    """Bar chart of the test accuracy per row (± 1 SE), the chance level and the base model as lines."""
    n = result["n_test"][target]
    rows = _rows(result, target)
    b = result.get("baselines")
    reporting.plot_test_bars(path, [r[0] for r in rows], [r[2] for r in rows], [stderr(r[2], n) for r in rows],
                             xlabel=f"{target} test accuracy, % ({n} items, ± 1 SE)",
                             chance=b["chance"] if b else None, base=b["base"] if b else None)


def timing_lines(result: dict, parts: dict[str, float]) -> str:
    t = result.get("timings_s", {})
    evo, fin = t.get("evolution", {}), t.get("final", {})
    return (f"    time: model {parts['model']:.1f}s | experts {parts['experts']:.1f}s | "
            f"evaluator start {t.get('evaluator_start', 0.0):.1f}s | "
            f"evolution ({result['generations']} generation{'s' * (result['generations'] != 1)}) "
            f"{evo.get('total', 0.0):.1f}s "
            f"[operators {evo.get('operators', 0.0):.1f}s, export {evo.get('export', 0.0):.1f}s, "
            f"scoring {evo.get('scoring', 0.0):.1f}s, checkpoints {evo.get('checkpoint', 0.0):.1f}s] | "
            f"test split + ensembles {fin.get('total', 0.0):.1f}s | "
            f"baselines {parts.get('baselines', 0.0):.1f}s | total {parts['total']:.1f}s")


if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
