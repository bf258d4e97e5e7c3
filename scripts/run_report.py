"""`genome run` after the search: the best adapter, test scores (best, best initial expert, top-k ensembles ranked
on dev), the fitness plot, the one metrics line per generation and the final summary table.

Wiring and reporting only: the scoring is scripts.scoring's, the ensembles evaluators.ensemble's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from evaluators.ensemble import DevRanking, ensemble, ensemble_task
from evaluators.tasks import weighted_fitness
from genome_jax import faults, reporting
from genome_jax.population import Population, export_adapter
from genome_jax.run_config import RunConfig
from scripts.scoring import LLMScorer, Timer, _digest, _host

BEST_ADAPTER = "best_adapter"


def stats_record(generation: int, fitness, best_ever, evaluated: dict, times: dict, elapsed: float) -> dict:
    """One line of metrics.jsonl: the population's fitness spread, what was scored, where the time went."""
    s = reporting.fitness_stats([float(f) for f in np.asarray(fitness)])
    return {"generation": generation, **s, "best_ever": reporting.clean_float(best_ever),
            "population": int(sum(1 for f in np.asarray(fitness) if f == f)), "evaluated": evaluated,
            "time": times, "elapsed_s": round(elapsed, 3)}


def export_best(best_factors, meta, out_dir: Path) -> Path:
    """out_dir/best_adapter: the best individual ever seen, as a PEFT folder (atomic replace)."""
    one = {m: {k: np.asarray(v)[None] for k, v in leaf.items()} for m, leaf in _host(best_factors).items()}
    return export_adapter(Population(factors=one, meta=dataclasses.replace(meta, names=("best",))), 0,
                          out_dir / BEST_ADAPTER)


def final_report(cfg: RunConfig, out_dir: Path, state, experts, experts_info: dict, scorer, timer: Timer,
                  progress: bool) -> dict:
    """best_adapter/, test scores (best, best initial expert, top-k ensembles ranked on dev), fitness.png."""
    meta = experts.meta
    with timer("export"):
        export_best(state.best, meta, out_dir)
    faults.point("best_exported")
    exp_fit = [np.nan if f is None else f for f in experts_info["dev_fitness"]]
    e_best = int(np.nanargmax(exp_fit)) if np.isfinite(exp_fit).any() else 0
    result: dict[str, Any] = {
        "method": cfg.method,
        "tasks": list(cfg.tasks),
        "task_weights": list(cfg.weights),
        "best": {"dev_fitness": reporting.clean_float(state.best_fitness), "adapter": str(out_dir / BEST_ADAPTER)},
        "best_initial_expert": {"name": meta.names[e_best], "dev_fitness": reporting.clean_float(exp_fit[e_best])},
        "experts_dev_fitness": dict(zip(experts_info["names"], experts_info["dev_fitness"])),
    }
    test_bars: dict[str, float | None] = {}
    if cfg.synthetic:
        result["problem"] = "synthetic TEST PROBLEM: fitness = -relative distance of ΔW to a hidden mix of the experts"
        result["test"] = None  # the test problem has no test split
        test_bars = {}
    else:
        t = _test_report(cfg, state, experts, e_best, scorer, timer, progress)
        result["best"].update(t.pop("best"))
        result["best_initial_expert"].update(t.pop("best_initial_expert"))
        result.update(t)
        test_bars = {"best initial expert": result["best_initial_expert"]["test_fitness"],
                     "evolved best": result["best"]["test_fitness"]}
        for e in result["ensembles"]:
            test_bars[f"ensemble k={e['k']}"] = e["test_fitness"]
    with timer("report"):
        reporting.plot_fitness(reporting.read_metrics(out_dir), out_dir / reporting.PLOT, test_bars=test_bars,
                               reference={"best initial expert (dev)": result["best_initial_expert"]["dev_fitness"]},
                               title=f"{cfg.method} on {'+'.join(Path(t).stem for t in cfg.tasks)}",
                               ylabel="dev fitness" + (" (synthetic)" if cfg.synthetic else ""))
    return result


def _test_report(cfg: RunConfig, state, experts, e_best: int, scorer: LLMScorer, timer: Timer,
                 progress: bool) -> dict:
    """Score on the test split: the best individual, the best initial expert (chosen on dev), and the top-k by DEV
    fitness of the best-ever + final population, whose test predictions are ensembled for k = 1..K."""
    meta = experts.meta
    # the ensemble pool: the best individual ever seen (GENOME+ particles may have moved away from it), then the
    # final population; ranked by dev fitness (ties keep this order), copies dropped
    best = _host(state.best)
    pop = _host(state.population)
    pool = jax.tree_util.tree_map(lambda b, p: np.concatenate([b[None], p], axis=0), best, pop)
    fit = np.concatenate([[float(state.best_fitness)], np.asarray(state.fitness, np.float64)])
    order = [int(i) for i in np.argsort(-np.where(np.isfinite(fit), fit, -np.inf), kind="stable") if np.isfinite(fit[i])]
    top, seen = [], set()
    for i in order:  # distinct individuals only: copies of an elite would only repeat its votes
        d = _digest(pool, i)
        if d not in seen:
            seen.add(d)
            top.append(i)
        if len(top) == cfg.ensemble_k:
            break
    exp = _host(experts.factors)
    # candidates: [best, expert, top...] as one numpy population
    rows = [jax.tree_util.tree_map(lambda a: a[None], best),
            jax.tree_util.tree_map(lambda a: a[e_best:e_best + 1], exp)]
    rows += [jax.tree_util.tree_map(lambda a, i=i: a[i:i + 1], pool) for i in top]
    cand = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *rows)
    names = ["best", f"expert:{meta.names[e_best]}"] + [f"top{j + 1}" for j in range(len(top))]
    test = scorer.evaluate(cand, meta, names, scorer.report_tasks, "test", cfg.n_test, timer, desc="test split")
    fit_names = [t.name for t in scorer.fit_tasks]
    unseen_names = [t.name for t in scorer.report_tasks[len(scorer.fit_tasks):]]

    def summary(res: dict) -> dict:
        return {"test_fitness": weighted_fitness([res[t] for t in fit_names], cfg.weights),
                "test_scores": {t: r.score for t, r in res.items()},
                # per item, for paired comparisons on the same items (genome bench quality)
                "test_per_sample": {t: list(r.per_sample) for t, r in res.items()},
                "test_ids": {t: list(r.ids) for t, r in res.items()}}

    out: dict[str, Any] = {}
    out["best"] = summary(test[0])
    out["best_initial_expert"] = summary(test[1])
    out["unseen_tasks"] = unseen_names
    out["n_test"] = {t.name: len(test[0][t.name].predictions) for t in scorer.report_tasks}
    out["ensembles"] = []
    if not top:  # no individual of the final population has a finite fitness: nothing to ensemble
        return out
    # ensembles: ranking from DEV results of the members (served by the result cache), never from test
    top_factors = jax.tree_util.tree_map(lambda a: a[np.asarray(top)], pool)
    dev = scorer.evaluate(top_factors, meta, names[2:], scorer.fit_tasks, "dev", cfg.n_dev, timer, desc="dev ranking")
    ranking = DevRanking.from_dev_results([[r[t] for t in fit_names] for r in dev], cfg.weights)
    test_top = test[2:]
    report = ensemble(ranking, [[r[t] for t in fit_names] for r in test_top], cfg.weights, k_max=len(top))
    unseen = {t: ensemble_task(ranking, [r[t] for r in test_top], len(top)) for t in unseen_names}
    ens = []
    for j in range(len(top)):
        scores = {t: (e.prob_avg or e.vote)[j] for t, e in report.per_task.items()}
        scores.update({t: (e.prob_avg or e.vote)[j] for t, e in unseen.items()})
        ens.append({"k": j + 1, "members": [names[2 + i] for i in ranking.order[:j + 1]],
                    "test_fitness": report.weighted[j], "test_scores": scores,
                    "vote": {t: e.vote[j] for t, e in {**report.per_task, **unseen}.items()}})
    out["ensembles"] = ens
    out["ensemble_rule"] = "top-k by dev fitness; averaged option probabilities for choice_logprob tasks, else majority vote"
    out["n_dev"] = {t.name: len(dev[0][t.name].predictions) for t in scorer.fit_tasks}
    return out


def final_summary(result: dict, out_dir: Path) -> str:
    """A small table of the outcome (printed by `genome run`)."""
    lines = [f"done: {result.get('generations')} generations of {result['method']} -> {out_dir}"]
    if result.get("test") is None and "ensembles" not in result:
        lines.append(f"  best initial expert  dev {_f(result['best_initial_expert']['dev_fitness'])}"
                     f"  ({result['best_initial_expert']['name']})")
        lines.append(f"  evolved best         dev {_f(result['best']['dev_fitness'])}")
    else:
        tasks = list(result["best"]["test_scores"])
        head = "  " + f"{'':24}" + f"{'dev':>8}{'test':>8}" + "".join(f"{t[:10]:>11}" for t in tasks)
        lines.append(head)

        def row(label, entry):
            return ("  " + f"{label:24}" + f"{_f(entry.get('dev_fitness')):>8}{_f(entry['test_fitness']):>8}"
                    + "".join(f"{_f(entry['test_scores'].get(t)):>11}" for t in tasks))

        lines.append(row("best initial expert", {**result["best_initial_expert"],
                                                  "dev_fitness": result["best_initial_expert"].get("dev_fitness")}))
        lines.append(row("evolved best", result["best"]))
        for e in result["ensembles"]:
            lines.append(row(f"ensemble k={e['k']}", e))
        if result.get("unseen_tasks"):
            lines.append(f"  (test column = weighted fitness tasks; unseen tasks: {', '.join(result['unseen_tasks'])})")
    lines.append(f"  files: {out_dir}/result.json  metrics.jsonl  fitness.png  {BEST_ADAPTER}/")
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"
