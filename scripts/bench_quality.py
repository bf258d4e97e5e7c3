"""`genome bench quality`: does evolution beat its parents, on tasks no expert was trained on?

    genome bench quality [--targets arc_e piqa] [--seeds 3] [--methods genome_plus [genome]] [--pool demo]
                         [--zero_shot hellaswag] [--output_dir runs/quality] [--quick] [--allow-overlap] ...

Per target (a multiple-choice task no expert was trained on), all on the same items and with loglik scoring:
  1. baselines, scored once: the base model, every expert, the uniform linear merge and a TIES merge of all experts
     (mergekit defaults: density 1, normalised by the agreeing weights, lambda 1; in ΔW space, re-factored at rank r),
     on the dev split (to choose the best expert) and the test split;
  2. one `genome run` per method and seed, fitness on the target's dev split; its folder holds the evolved best
     (chosen on dev), the dev-ranked top-k ensembles and the zero-shot tasks' test scores.
Then quality.json (every number, the config, the sha256 of the data and adapters), quality.md (the tables) and
quality_<target>.png. Re-running the same command continues where it stopped: finished baselines and runs are read
back, never rescored, so each test split is scored once per finished run.

Honesty: fitness, selection, early stopping, the evolved best and the ensemble members come from dev (inside
`genome run`); the best expert is chosen on dev here; test numbers only enter the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evaluators import stats
from evaluators.backends.base import make_evaluator
from evaluators.backends.peft_folder import adapter_info
from evaluators.provenance import read_provenance
from evaluators.tasks import get_task, list_tasks
from genome_jax import reporting
from genome_jax.errors import UserError
from genome_jax.model_store import default_model_path
from genome_jax.operators.merge import MergeConfig, crossover
from genome_jax.population import Population, adapter_folders, export_adapter, load_population
from genome_jax.run_config import file_digests, load_run_config
from scripts import demo, run_loop, train_experts
from scripts.scoring import max_lora_rank

BENCH = "bench.json"
RESULT_JSON, RESULT_MD = "quality.json", "quality.md"

# Sized on this 2-core box (docs/QUALITY.md): the full default run took 66 minutes (budget: 90). Each target is the
# other's zero-shot task, so no extra zero-shot task by default (hellaswag would add about 12 minutes).
DEFAULTS = {"targets": ["arc_e", "piqa"], "zero_shot": [], "seeds": 3, "methods": ["genome_plus"],
            "population_size": 4, "max_population_size": 4, "max_iter": 2, "n_dev": 100, "n_test": 200,
            "ensemble_k": 3, "pool": "demo"}
QUICK = {"targets": ["arc_e"], "zero_shot": ["piqa"], "seeds": 1, "population_size": 2, "max_population_size": 3,
         "max_iter": 1, "n_dev": 8, "n_test": 12, "ensemble_k": 2, "pool": "smoke"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--targets", nargs="+", help=f"target tasks, fitness on their dev split (default {' '.join(d['targets'])})")
    p.add_argument("--zero_shot", nargs="*", help="extra tasks scored zero-shot (besides the other targets; "
                   f"default {' '.join(d['zero_shot']) or 'none'})")
    p.add_argument("--seeds", type=int, help=f"seeds per target and method (default {d['seeds']})")
    p.add_argument("--methods", nargs="+", choices=("genome_plus", "genome"), help="default genome_plus")
    p.add_argument("--pool", choices=train_experts.POOLS, help=f"expert pool to train or reuse (default {d['pool']})")
    p.add_argument("--lora_dir", help="a folder of PEFT expert folders instead of --pool")
    p.add_argument("--model_path", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    for name in ("population_size", "max_population_size", "max_iter", "n_dev", "n_test", "ensemble_k"):
        p.add_argument(f"--{name}", type=int, help=f"default {d[name]}")
    p.add_argument("--output_dir", default="runs/quality", help="bench folder; re-running continues it")
    p.add_argument("--quick", action="store_true", help="smoke-sized (minutes): checks the plumbing, claims nothing")
    p.add_argument("--allow-overlap", dest="allow_overlap", action="store_true",
                   help="allow a target that an expert was trained on")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The bench's config: flags over --quick's sizes over the defaults."""
    cfg = dict(DEFAULTS, **(QUICK if args.quick else {}))
    for k in list(cfg):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    cfg.update(quick=bool(args.quick), allow_overlap=bool(args.allow_overlap), lora_dir=args.lora_dir,
               model_path=args.model_path)
    return cfg


# ------------------------------------------------------------------------------------------------- checks
def check_values(cfg: dict) -> None:
    """Bad flags -> UserError (one line) before anything is trained or written."""
    known = set(list_tasks())
    for t in cfg["targets"] + cfg["zero_shot"]:
        if t not in known:
            raise UserError(f"unknown task '{t}' (known: {', '.join(sorted(known))})")
    if cfg["seeds"] < 1:
        raise UserError(f"--seeds must be at least 1, got {cfg['seeds']}")
    for k in ("population_size", "max_iter", "n_dev", "n_test", "ensemble_k"):
        if cfg[k] < 1:
            raise UserError(f"--{k} must be at least 1, got {cfg[k]}")


def check_pool(cfg: dict, expert_tasks: dict[str, list[str]]) -> None:
    """A pool that cannot answer the question -> UserError (one line) before anything is written."""
    if len(expert_tasks) < 2:
        raise UserError(f"the expert pool has {len(expert_tasks)} expert(s); the bench needs at least 2")
    if not cfg["allow_overlap"]:
        for t in cfg["targets"]:
            trained = [e for e, ts in expert_tasks.items() if t in ts]
            if trained:
                raise UserError(f"target '{t}' is a task expert '{trained[0]}' was trained on (pass --allow-overlap "
                                "to bench it anyway)")


def experts_tasks(lora_dir: Path) -> dict[str, list[str]]:
    """{expert folder name: tasks its provenance says it was trained on} (empty when unknown)."""
    return {d.name: sorted({e["task"] for e in read_provenance(d)["entries"]}) for d in adapter_folders(lora_dir)}


def zero_shot_tasks(cfg: dict, target: str, expert_tasks: dict[str, list[str]]) -> list[str]:
    """Tasks used neither for this target's fitness nor for any expert's training."""
    trained = {t for ts in expert_tasks.values() for t in ts}
    out = []
    for t in cfg["targets"] + cfg["zero_shot"]:
        if t != target and t not in trained and t not in out:
            out.append(t)
    return out


def _identity(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("quick",)}


def _begin(out: Path, cfg: dict, digests: dict) -> None:
    """bench.json: a re-run continues only the same bench."""
    path = out / BENCH
    if path.exists():
        saved = json.loads(path.read_text())
        diff = [f"{k}: {saved['config'].get(k)!r} -> {v!r}" for k, v in _identity(cfg).items()
                if saved["config"].get(k) != v]
        if diff:
            raise UserError(f"{out} holds a bench with another config ({'; '.join(diff)}); use another --output_dir")
        changed = sorted(k for k, v in digests.items() if saved["sha256"].get(k, v) != v)
        if changed:
            raise UserError(f"{changed[0]} changed since this bench started; use another --output_dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    reporting.write_json_atomic(path, {"config": _identity(cfg), "sha256": digests})


# ------------------------------------------------------------------------------------------------ baselines
def merges(lora_dir: Path, out: Path) -> dict[str, Path]:
    """The uniform linear merge (exact, rank E·r) and the TIES merge of all experts, as PEFT folders."""
    paths = {"uniform_merge": out / "uniform_merge", "ties_merge": out / "ties_merge"}
    if not (paths["uniform_merge"] / "adapter_config.json").exists():
        demo.uniform_merge(lora_dir, paths["uniform_merge"])
    if not (paths["ties_merge"] / "adapter_config.json").exists():
        pop = load_population(adapter_folders(lora_dir))
        k = pop.size
        config = MergeConfig(method="ties", density=1.0, normalize="weight", space="delta", svd="exact")
        child = crossover(jax.random.key(0), pop.factors, jnp.arange(k, dtype=jnp.int32)[None],
                          jnp.full((1, k), 1.0 / k, jnp.float32), config=config)
        export_adapter(Population(factors=child, meta=dataclasses.replace(pop.meta, names=("ties_merge",))), 0,
                       paths["ties_merge"])
    return paths


def _task_json(r) -> dict:
    return {"score": r.score, "per_sample": list(r.per_sample), "ids": list(r.ids)}


def score_baselines(cfg: dict, model_path: str, lora_dir: Path, merged: dict[str, Path], target: str,
                    zero_shot: list[str], out: Path, progress: bool) -> dict:
    """Rows base/expert:*/uniform_merge/ties_merge on the target's dev and test split, base and every expert on the
    zero-shot tasks' test split; written once to baselines/<target>.json and read back after."""
    path = out / "baselines" / f"{target}.json"
    if path.exists():
        return json.loads(path.read_text())
    experts = adapter_folders(lora_dir)
    rows = {"base": None, **{f"expert:{d.name}": str(d) for d in experts}, **{k: str(v) for k, v in merged.items()}}
    rank = max(adapter_info(p).rank for p in rows.values() if p)  # rank_pattern included
    ev = make_evaluator(model_path, max_lora_rank=max_lora_rank(rank),
                        cache_dir=str(out / "eval_cache"), progress=progress)
    task = get_task(target, formatter=model_path, mode="loglik")
    zs = [get_task(z, formatter=model_path, mode="loglik") for z in zero_shot]
    try:
        dev = ev.evaluate(list(rows.values()), [task], "dev", cfg["n_dev"])
        test = ev.evaluate(list(rows.values()), [task], "test", cfg["n_test"])
        # zero-shot: the base model and the best expert on dev (the rows the evolved best is compared with there)
        dev_rows = dict(zip(rows, dev))
        best_e = best_expert({k: {"dev": _task_json(r.tasks[target])} for k, r in dev_rows.items()})
        zero = ev.evaluate([rows["base"], rows[best_e]], zs, "test", cfg["n_test"]) if zs else []
    finally:
        ev.close()
    items = task.load("test", cfg["n_test"])
    res = {"rows": {name: {"dev": _task_json(d.tasks[target]), "test": _task_json(t.tasks[target])}
                    for name, d, t in zip(rows, dev, test)},
           "zero_shot": {name: {z: _task_json(r.tasks[z]) for z in zero_shot} for name, r in zip(["base", best_e], zero)},
           "chance": float(np.mean([1.0 / len(it["choices"]) for it in items]))}
    path.parent.mkdir(parents=True, exist_ok=True)
    reporting.write_json_atomic(path, res)
    return res


# ------------------------------------------------------------------------------------------------------ runs
def run_one(cfg: dict, model_path: str, lora_dir: Path, target: str, method: str, seed: int, zero_shot: list[str],
            out: Path) -> dict:
    """One `genome run` (resumed when interrupted); a finished run's result.json is read back, not rerun."""
    run_dir = out / "runs" / target / f"{method}-s{seed}"
    done = run_dir / reporting.RESULT
    if done.exists():
        return json.loads(done.read_text())
    rc = load_run_config({
        "tasks": [target], "test_tasks": zero_shot, "model_path": model_path, "lora_dir": str(lora_dir),
        "method": method, "seed": seed, "population_size": cfg["population_size"],
        "max_population_size": cfg["max_population_size"], "max_iter": cfg["max_iter"], "n_dev": cfg["n_dev"],
        "n_test": cfg["n_test"], "scoring": "loglik", "ensemble_k": cfg["ensemble_k"], "output_dir": str(run_dir),
        "allow_overlap": cfg["allow_overlap"],
        # the experts themselves start the population when it has room for them (as in `genome demo`)
        "init_merge": cfg["population_size"] < len(adapter_folders(lora_dir))})
    # the bench's result cache: the experts' dev and test scores of the baselines are hits, not rescored per run
    return run_loop.run(rc, run_dir, progress=False, log=lambda *a, **k: None, cache_dir=out / "eval_cache")


# ------------------------------------------------------------------------------------------------ the tables
def best_expert(rows: dict) -> str:
    """The expert row with the highest DEV score (ties: the first)."""
    experts = [k for k in rows if k.startswith("expert:")]
    return max(experts, key=lambda k: (rows[k]["dev"]["score"], -experts.index(k)))


def summarise(cfg: dict, target: str, base: dict, runs: dict[str, list[dict]]) -> dict:
    """Every row of one target: dev, test mean ± sd over seeds, paired bootstrap of the evolved best vs the best
    expert and vs the uniform merge (95%, over test items, seeds averaged per item)."""
    rows = base["rows"]
    experts = [k for k in rows if k.startswith("expert:")]
    best_e = best_expert(rows)
    table: list[dict] = []
    for name in ["base", *experts]:
        table.append({"row": name, "dev": rows[name]["dev"]["score"], "test": rows[name]["test"]["score"], "sd": None})
    table.append({"row": f"best expert on dev ({best_e[7:]})", "dev": rows[best_e]["dev"]["score"],
                  "test": rows[best_e]["test"]["score"], "sd": None})
    for name in ("uniform_merge", "ties_merge"):
        table.append({"row": name.replace("_", " "), "dev": rows[name]["dev"]["score"],
                      "test": rows[name]["test"]["score"], "sd": None})
    paired, zero = {}, {}
    ids = rows["base"]["test"]["ids"]
    for method, results in runs.items():
        if not results:
            continue
        for r in results:  # the same items as the baselines, in the same order
            if r["best"]["test_ids"][target] != ids:
                raise UserError(f"{target}: a run scored other test items than the baselines; use a fresh --output_dir")
        per_seed = np.array([r["best"]["test_per_sample"][target] for r in results])
        dev_m, dev_sd = stats.mean_sd([r["best"]["dev_fitness"] for r in results])
        test_m, test_sd = stats.mean_sd(per_seed.mean(axis=1))
        table.append({"row": f"{method} evolved best (dev-chosen)", "dev": dev_m, "dev_sd": dev_sd, "test": test_m,
                      "sd": test_sd, "seeds": [float(x) for x in per_seed.mean(axis=1)]})
        for k in range(1, cfg["ensemble_k"] + 1):
            ks = [e["test_scores"][target] for r in results for e in r["ensembles"] if e["k"] == k]
            if len(ks) == len(results):
                m, sd = stats.mean_sd(ks)
                table.append({"row": f"{method} ensemble top-{k} (dev-ranked)", "dev": None, "test": m, "sd": sd,
                              "seeds": [float(x) for x in ks]})
        paired[method] = {}
        for ref in (best_e, "uniform_merge", "ties_merge", "base"):
            d, lo, hi = stats.paired_bootstrap(per_seed, np.asarray(rows[ref]["test"]["per_sample"]))
            per_seed_gain = [float(x) for x in (per_seed - np.asarray(rows[ref]["test"]["per_sample"])).mean(axis=1)]
            paired[method][ref] = {"diff": d, "ci95": [lo, hi], "per_seed": per_seed_gain, "beyond_noise": lo > 0}
        zero[method] = {}
        for z in results[0]["unseen_tasks"]:
            ev = np.array([r["best"]["test_per_sample"][z] for r in results])
            b = np.asarray(base["zero_shot"]["base"][z]["per_sample"])
            e = np.asarray(base["zero_shot"][best_e][z]["per_sample"])
            m, sd = stats.mean_sd(ev.mean(axis=1))
            zero[method][z] = {"base": float(b.mean()), "best_expert": float(e.mean()), "evolved": m, "evolved_sd": sd,
                               "vs_base": stats.paired_bootstrap(ev, b), "vs_best_expert": stats.paired_bootstrap(ev, e)}
    return {"target": target, "best_expert": best_e, "chance": base["chance"], "n_test": len(ids), "rows": table,
            "paired": paired, "zero_shot": zero, "dev_test": dev_test_points(target, rows, runs),
            "selection_gap": selection_gap(target, rows, runs)}


def dev_test_points(target: str, rows: dict, runs: dict[str, list[dict]]) -> list[dict]:
    """Every individual scored on both splits of `target`: the baseline rows and each seed's evolved best
    -> [{label, kind, dev, test}]."""
    pts = [{"label": k, "kind": "baseline", "dev": v["dev"]["score"], "test": v["test"]["score"]} for k, v in rows.items()]
    for method, results in runs.items():
        pts += [{"label": f"{method} s{seed}", "kind": "evolved", "dev": r["best"]["dev_fitness"],
                 "test": float(np.mean(r["best"]["test_per_sample"][target]))} for seed, r in enumerate(results)]
    return pts


def selection_gap(target: str, rows: dict, runs: dict[str, list[dict]]) -> dict:
    """Dev minus test, in accuracy: the unselected baseline rows measure how the splits differ; the evolved best,
    picked as the maximum of many noisy dev scores, also carries the winner's curse (its dev score overstates it)."""
    pts = dev_test_points(target, rows, runs)
    base_gaps = [p["dev"] - p["test"] for p in pts if p["kind"] == "baseline"]
    evo_gaps = [p["dev"] - p["test"] for p in pts if p["kind"] == "evolved"]
    out = {"baselines_mean": float(np.mean(base_gaps))}
    if evo_gaps:
        out["evolved_mean"] = float(np.mean(evo_gaps))
        out["excess"] = out["evolved_mean"] - out["baselines_mean"]
    return out


def _pct(x, sd=None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


def markdown(cfg: dict, per_target: list[dict]) -> str:
    n_seeds = cfg["seeds"]
    lines = [f"Test accuracy (loglik), {cfg['n_test']} test items per target; dev = {cfg['n_dev']} items; "
             f"evolved rows: mean ± sd over {n_seeds} seed{'s' * (n_seeds > 1)}."]
    for s in per_target:
        lines += ["", f"### {s['target']} (chance {100 * s['chance']:.1f}%)", "", "| row | dev % | test % |", "|---|---|---|"]
        lines += [f"| {r['row']} | {_pct(r['dev'], r.get('dev_sd'))} | {_pct(r['test'], r['sd'])} |" for r in s["rows"]]
        for method, p in s["paired"].items():
            lines += ["", f"{method} evolved best, paired difference on test (95% bootstrap over items):", ""]
            for ref, v in p.items():
                lo, hi = v["ci95"]
                verdict = "beyond noise" if v["beyond_noise"] else "not beyond noise"
                lines.append(f"- vs {ref}: {100 * v['diff']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], per seed "
                             f"{', '.join(f'{100 * g:+.1f}' for g in v['per_seed'])}: {verdict}")
        for method, z in s["zero_shot"].items():
            for task, v in z.items():
                lines.append(f"- zero-shot {task} ({method}): base {_pct(v['base'])}, best expert {_pct(v['best_expert'])}, "
                             f"evolved {_pct(v['evolved'], v['evolved_sd'])} (vs base {100 * v['vs_base'][0]:+.1f} "
                             f"[{100 * v['vs_base'][1]:+.1f}, {100 * v['vs_base'][2]:+.1f}])")
    for s in per_target:
        g = s.get("selection_gap", {})
        if "excess" in g:
            lines.append(f"- {s['target']}: dev minus test is {100 * g['evolved_mean']:+.1f} points for the evolved best "
                         f"and {100 * g['baselines_mean']:+.1f} for the unselected rows: the dev score of the chosen "
                         f"individual overstates its test score by {100 * g['excess']:+.1f} points (selection on a "
                         f"noisy dev split)")
    wins = [s["target"] for s in per_target
            if any(p[s["best_expert"]]["beyond_noise"] and p["uniform_merge"]["beyond_noise"] for p in s["paired"].values())]
    lines += ["", f"Evolved best beats both the best expert and the uniform merge beyond noise on {len(wins)} of "
              f"{len(per_target)} target(s){': ' + ', '.join(wins) if wins else ''}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Test accuracy per row (error bars: sd over seeds, or the binomial SE of a single score); chance and base."""
    rows, n = summary["rows"], summary["n_test"]
    # sd over seeds where there are several, else the binomial SE of the one score
    err = [r["sd"] if r["sd"] is not None and len(r.get("seeds", [])) > 1 else stats.binomial_se(r["test"], n)
           for r in rows]
    reporting.plot_test_bars(path, [r["row"] for r in rows], [r["test"] for r in rows], err,
                             xlabel=f"{summary['target']} test accuracy, % ({n} items; bars: sd over seeds or ± 1 SE)",
                             chance=summary["chance"], base=rows[0]["test"])


def plot_dev_test(per_target: list[dict], path: Path) -> None:
    """Dev vs test accuracy of every individual scored on both (baseline rows, each seed's evolved best), one panel
    per target; the diagonal is dev = test."""
    import matplotlib  # heavy (~0.5 s): only a finished bench draws

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    fig, axes = plt.subplots(1, len(per_target), figsize=(5.2 * len(per_target), 4.6), squeeze=False)
    for ax, s in zip(axes[0], per_target):
        pts = s["dev_test"]
        vals = [100 * p[k] for p in pts for k in ("dev", "test")]
        lo, hi = min(vals) - 3, max(vals) + 3
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":", label="dev = test")
        for kind, marker, color in (("baseline", "o", "#4c72b0"), ("evolved", "*", "#c44e52")):
            sel = [p for p in pts if p["kind"] == kind]
            ax.scatter([100 * p["dev"] for p in sel], [100 * p["test"] for p in sel], marker=marker, s=70, color=color,
                       label="baselines" if kind == "baseline" else "evolved best (per seed)")
            for p in sel if kind == "baseline" else []:
                ax.annotate(p["label"].replace("expert:", ""), (100 * p["dev"], 100 * p["test"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        se = 100 * stats.binomial_se(0.6, s["n_test"])
        ax.set_title(f"{s['target']} (test SE about {se:.1f} points)")
        ax.set_xlabel("dev accuracy, %")
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_curves(curves: dict[str, dict[str, list[dict]]], best_expert_dev: dict[str, float], path: Path) -> None:
    """Dev fitness per generation (best and mean of the population) of every run, one panel per target, with the
    dev score of the best expert as a dotted line. curves: target -> run label -> metrics.jsonl records."""
    import matplotlib  # heavy (~0.5 s): only a finished bench draws

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.2), squeeze=False)
    for ax, (target, runs) in zip(axes[0], curves.items()):
        for i, (label, recs) in enumerate(runs.items()):
            g = [r["generation"] for r in recs]
            color = f"C{i}"
            ax.plot(g, [100 * r["best"] for r in recs], marker="o", color=color, label=f"{label} best")
            ax.plot(g, [100 * r["mean"] for r in recs], ls="--", color=color, alpha=0.6, label=f"{label} mean")
        ax.axhline(100 * best_expert_dev[target], color="grey", ls=":", label="best expert (dev)")
        ax.set_xticks(sorted({r["generation"] for recs in runs.values() for r in recs}))
        ax.set_title(f"{target}: dev fitness per generation")
        ax.set_xlabel("generation (0 = initial population)")
        ax.set_ylabel("dev accuracy, %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def read_curves(out: Path, cfg: dict) -> dict[str, dict[str, list[dict]]]:
    """target -> "method sN" -> the run's metrics.jsonl records (generation order)."""
    curves: dict[str, dict[str, list[dict]]] = {}
    for t in cfg["targets"]:
        curves[t] = {}
        for m in cfg["methods"]:
            for seed in range(cfg["seeds"]):
                f = out / "runs" / t / f"{m}-s{seed}" / "metrics.jsonl"
                recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []
                curves[t][f"{m} s{seed}"] = sorted(recs, key=lambda r: r["generation"])
    return curves


# ------------------------------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    cfg = settings(args)
    check_values(cfg)
    out = Path(args.output_dir)
    model_path = cfg["model_path"] or str(default_model_path())
    if cfg["lora_dir"] and not Path(cfg["lora_dir"]).is_dir():
        raise UserError(f"--lora_dir {cfg['lora_dir']}: not a folder")
    lora_dir = Path(cfg["lora_dir"]) if cfg["lora_dir"] else train_experts.ensure_pool(model_path, cfg["pool"],
                                                                                      progress=not args.quiet)
    expert_tasks = experts_tasks(lora_dir)
    check_pool(cfg, expert_tasks)
    files = [Path(p) for t in cfg["targets"] + cfg["zero_shot"] if (p := getattr(get_task(t), "path", None))]
    files += [f for d in adapter_folders(lora_dir) for f in sorted(d.iterdir()) if f.is_file()]
    digests = file_digests(files)
    _begin(out, cfg, digests)

    t0 = time.perf_counter()
    jobs = [(t, None, None) for t in cfg["targets"]]
    jobs += [(t, m, s) for t in cfg["targets"] for m in cfg["methods"] for s in range(cfg["seeds"])]
    bar = reporting.progress_bar(len(jobs), "bench quality", disable=args.quiet, unit="job")
    merged = merges(lora_dir, out / "merges")
    base: dict[str, dict] = {}
    runs: dict[str, dict[str, list[dict]]] = {t: {m: [] for m in cfg["methods"]} for t in cfg["targets"]}
    for target, method, seed in jobs:
        zs = zero_shot_tasks(cfg, target, expert_tasks)
        bar.set_postfix_str(f"{target} {'baselines' if method is None else f'{method} seed {seed}'}")
        if method is None:
            base[target] = score_baselines(cfg, model_path, lora_dir, merged, target, zs, out, not args.quiet)
        else:
            runs[target][method].append(run_one(cfg, model_path, lora_dir, target, method, seed, zs, out))
        bar.update(1)
    bar.close()
    per_target = [summarise(cfg, t, base[t], runs[t]) for t in cfg["targets"]]
    md = markdown(cfg, per_target)
    result = {"config": _identity(cfg), "sha256": digests, "lora_dir": str(lora_dir), "model_path": model_path,
              "targets": per_target, "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
    reporting.write_json_atomic(out / RESULT_JSON, result)
    (out / f".{RESULT_MD}.tmp").write_text(md)
    (out / f".{RESULT_MD}.tmp").replace(out / RESULT_MD)
    for s in per_target:
        plot(s, out / f"quality_{s['target']}.png")
    plot_dev_test(per_target, out / "quality_dev_vs_test.png")
    plot_curves(read_curves(out, cfg), {t: base[t]["rows"][best_expert(base[t]["rows"])]["dev"]["score"]
                                        for t in cfg["targets"]}, out / "quality_fitness.png")
    print(md, end="")
    print(f"files: {out}/{RESULT_JSON}, {RESULT_MD}, quality_<target>.png, quality_dev_vs_test.png, "
          f"quality_fitness.png; wall {time.perf_counter() - t0:.0f} s")
    return 0

