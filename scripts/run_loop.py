"""`genome run`: the GENOME / GENOME+ search (genome_jax.evolve) wired to the scorers and the run folder.

    experts (PEFT folders) -> initial population -> per generation (genome_jax.evolve.evolve):
        ask -> export changed children (tmpfs) -> score (cached by content hash) -> tell -> checkpoint -> metrics line
    -> best adapter, test scores (best, best initial expert, ensembles of the top k by dev fitness), result.json, plot

Wiring only: the loop and the maths live in genome_jax, scoring in scripts.scoring (evaluators behind it), the checks
before the run in scripts.run_prepare, the report after it in scripts.run_report.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np

from genome_jax import faults, reporting, run_lock, synthetic
from genome_jax.checkpoint import RunCheckpointer, restore_latest
from genome_jax.compile_cache import enable_compilation_cache
from genome_jax.evolve import evolve, initial_keys
from genome_jax.model_store import default_model_path
from genome_jax.population import Population, PopulationMeta, load_population
from genome_jax.run_config import RunConfig, run_config_from_dict, save_run_config
from genome_jax.strategies import strategy_params
from genome_jax.sharding import ShardedStrategy
from scripts.run_prepare import (
    RUN_CONFIG,
    check_data,
    check_experts_fit_model,
    data_digests,
    last_saved_generation,
    population_mesh,
    prepare,
    provenance_report,
    read_json,
    remove_orphan_temps,
    saved_identity,
)
from scripts.run_report import final_report, final_summary, stats_record
from scripts.scoring import LLMScorer, SyntheticScorer, Timer

EXPERTS = "experts.json"
# the `genome run` command's entry points (run_cmd, demo): prepared here or in run_prepare / run_report
__all__ = ["prepare", "check_data", "last_saved_generation", "run", "final_summary", "data_digests",
           "load_experts", "saved_state", "run_identity", "EXPERTS", "RUN_CONFIG"]


def load_experts(cfg: RunConfig) -> Population:
    """The parent pool as a Population (synthetic without --lora_dir: small random experts)."""
    if cfg.lora_dir is not None:
        return load_population(cfg.lora_dir)
    factors = synthetic.synthetic_experts(cfg.seed)
    leaf = next(iter(factors.values()))
    meta = PopulationMeta(base_model="synthetic", rank=int(leaf["A"].shape[1]),
                          target_modules=tuple(sorted({p.rsplit(".", 1)[-1] for p in factors})),
                          names=tuple(f"synthetic-expert-{i}" for i in range(leaf["A"].shape[0])))
    return Population(factors=factors, meta=meta)


def run_identity(cfg: RunConfig, strategy, params, experts: Population) -> dict:
    """What a checkpoint is resumed under: the run's identity fields, the strategy's record, the experts' digest."""
    return {"run": cfg.identity(), **strategy.record(params), "experts": synthetic.experts_digest(experts.factors)}


def saved_state(out_dir: Path):
    """The newest intact checkpointed strategy state of a run folder, restored onto this process's default device
    (whatever device count wrote it): a genome_jax.checkpoint.Restored, or None when no step is saved."""
    cfg = run_config_from_dict(read_json(out_dir / RUN_CONFIG), str(out_dir / RUN_CONFIG))
    strategy, params = strategy_params(cfg)
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((strategy.population_size,) + a.shape[1:], a.dtype),
                                    load_experts(cfg).factors)
    return restore_latest(out_dir / "checkpoints", strategy.state_template(shapes, params))


def run(cfg: RunConfig, out_dir: Path, *, progress: bool = True, log=print,
        data_changes: list[dict] | None = None, cache_dir: Path | None = None) -> dict:
    """Run (or resume) the evolution described by `cfg` in `out_dir`; returns the result dict (also result.json).
    One writer per folder: raises UserError at once when another live run holds `out_dir` (genome_jax.run_lock).
    data_changes: what `check_data` found changed and --allow-data-change accepted (recorded in result.json).
    cache_dir: the result cache to use (default out_dir/eval_cache)."""
    created = not out_dir.exists()
    had_lock_file = (out_dir / run_lock.LOCK_NAME).exists()
    try:
        with run_lock.hold(out_dir):
            return _run(cfg, out_dir, progress=progress, log=log, created=created, data_changes=data_changes,
                        cache_dir=cache_dir)
    except BaseException:  # refused before writing anything (e.g. experts that do not fit the model): leave no trace
        if not had_lock_file and not (out_dir / RUN_CONFIG).exists():
            (out_dir / run_lock.LOCK_NAME).unlink(missing_ok=True)
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _experts_info(out_dir: Path, scorer, experts: Population, timer: Timer, progress: bool) -> dict:
    """The parents' own dev fitness (for "best initial expert" in the report): experts.json, scored once per run."""
    info = read_json(out_dir / EXPERTS)
    if info is None:
        fit = scorer.dev_fitness(experts.factors, list(range(experts.size)), experts.meta, timer, progress)
        info = {"names": list(experts.meta.names), "dev_fitness": [reporting.clean_float(f) for f in fit]}
        reporting.write_json_atomic(out_dir / EXPERTS, info)
    return info


def _run(cfg: RunConfig, out_dir: Path, *, progress: bool, log, created: bool, data_changes: list[dict] | None,
         cache_dir: Path | None) -> dict:
    t_start = time.perf_counter()
    timer = Timer()
    enable_compilation_cache()  # a resumed or repeated run skips recompiling (GENOME_JAX_COMPILE_CACHE)
    strategy, params = strategy_params(cfg)
    provenance = provenance_report(cfg)  # the experts' training data vs the run's tasks, for result.json
    mesh = population_mesh(cfg, strategy)  # --devices N: the population axis sharded over N local devices
    if mesh is not None:
        strategy = ShardedStrategy(strategy, mesh)
    with timer("load"):
        experts = load_experts(cfg)
        model_path = None if cfg.synthetic else (cfg.model_path or str(default_model_path()))
        if model_path is not None:
            check_experts_fit_model(experts, cfg.lora_dir, model_path)
    meta = experts.meta
    identity = run_identity(cfg, strategy, params, experts)
    if data_changes:  # --allow-data-change: changed experts keep the run's identity (the user vouched for them)
        identity["experts"] = saved_identity(out_dir).get("experts", identity["experts"])

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(out_dir)  # left by a killed run of this folder (one run per folder at a time)
    scorer = None
    try:
        if not (out_dir / RUN_CONFIG).exists():
            save_run_config(cfg, out_dir / RUN_CONFIG, data=data_digests(cfg))
        ckpt = RunCheckpointer(out_dir / "checkpoints", identity)
        with timer("evaluator_start"):
            if cfg.synthetic:
                scorer = SyntheticScorer(experts.factors, cfg.seed)
            else:
                # cache_dir: a caller's shared result cache (keys are content digests, so sharing is safe)
                scorer = LLMScorer(cfg, model_path, meta.rank, cache_dir or out_dir / "eval_cache", progress)
    except BaseException:
        if scorer is not None:
            scorer.close()
        if created:  # nothing of value was written yet: leave no half-made run folder behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise

    try:
        t_evo = time.perf_counter()
        at_evolution = dict(timer.total)
        experts_info = _experts_info(out_dir, scorer, experts, timer, progress)
        k_pop, k_run = initial_keys(jax.random.PRNGKey(cfg.seed))
        gen = {"before": dict(timer.total), "hits": 0}  # this generation's start (timer totals) and cache hits

        def fitness(children, need):
            idx = [int(i) for i in np.flatnonzero(need)]
            hits = scorer.cache_hits
            out = np.full(need.shape, np.nan, np.float32)
            out[idx] = scorer.dev_fitness(children, idx, meta, timer, progress)
            gen["hits"] = scorer.cache_hits - hits
            return out

        def on_generation(g: int, state, m: dict) -> None:
            for phase, seconds in m["time_s"].items():  # the loop's own phases, next to export / scoring
                timer.add(phase, seconds)
            faults.point("checkpoint_in_flight")
            faults.point("checkpoint_committed", before_kill=ckpt.wait)
            if g == 0:
                reporting.truncate_metrics(out_dir, -1)
            hits, children = gen["hits"], m.get("children", m["scored"])
            evaluated = {"scored": m["scored"] - hits, "cached": children - m["scored"] + hits, "cache_hits": hits}
            rec = stats_record(g, state.fitness, state.best_fitness, evaluated, timer.since(gen["before"]),
                               time.perf_counter() - t_start)
            reporting.append_metrics(out_dir, rec)
            faults.point("metrics_appended")
            log(reporting.summary_line(rec, cfg.max_iter))
            gen.update(before=dict(timer.total), hits=0)

        def on_resume(step: int, state) -> None:
            reporting.truncate_metrics(out_dir, step)
            if not any(r.get("generation") == step for r in reporting.read_metrics(out_dir)):
                # killed after the checkpoint committed but before its metrics line: rebuild it from the state
                # (fitness columns exact; evaluated/time of that generation are lost)
                reporting.append_metrics(out_dir, {**stats_record(step, state.fitness, state.best_fitness, {}, {},
                                                                  0.0), "rebuilt": True})
            log(f"resuming {out_dir} from generation {step}")
            gen["before"] = dict(timer.total)

        evo = evolve(k_run, strategy, params,
                     lambda: strategy.initial_population(k_pop, experts.factors, init_merge=cfg.init_merge), fitness,
                     max_iter=cfg.max_iter, patience=cfg.early_stop_iter, checkpointer=ckpt,
                     on_generation=on_generation, on_resume=on_resume)
        with timer("checkpoint"):
            ckpt.close()
        evolution = {**timer.since(at_evolution), "total": round(time.perf_counter() - t_evo, 3)}
        at_final, t_final = dict(timer.total), time.perf_counter()
        result = final_report(cfg, out_dir, evo.state, experts, experts_info, scorer, timer, progress)
        result.update(generations=evo.generation, stopped_early=evo.stopped_early, resumed_from=evo.resumed_from,
                      provenance=provenance)
        if data_changes:
            result.update(allow_data_change=True, data_changed=data_changes)
        # where the time went (this process only: a resumed run reports its own share)
        result["timings_s"] = {
            "load": round(at_evolution.get("load", 0.0), 3),
            "evaluator_start": round(at_evolution.get("evaluator_start", 0.0), 3),
            "evolution": evolution,  # initial population + generations: operators / export / scoring / checkpoint
            "final": {**timer.since(at_final), "total": round(time.perf_counter() - t_final, 3)},  # best + test
            "total": round(time.perf_counter() - t_start, 3),
        }
        reporting.write_json_atomic(out_dir / reporting.RESULT, result)
        return result
    except BaseException:
        if created and not (out_dir / EXPERTS).exists():  # failed before anything of value was saved
            try:
                ckpt.wait()
            except Exception:
                pass
            if not any(p.name.isdigit() for p in (out_dir / "checkpoints").iterdir()):
                shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        try:
            ckpt.close()
        except Exception:
            pass
        scorer.close()
