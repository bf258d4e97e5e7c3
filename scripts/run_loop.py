"""The GENOME / GENOME+ run loop: JAX strategies (genome_jax) wired to the evaluator process (evaluators).

    experts (PEFT folders) -> initial population -> per generation:
        ask (jit) -> export changed children (tmpfs) -> score (cached by content hash) -> tell -> metrics -> checkpoint
    -> best adapter, test scores (best, best initial expert, ensembles of the top k by dev fitness), result.json, plot

Wiring only: the maths lives in genome_jax (strategies, operators, population), scoring in evaluators.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from genome_jax import faults, run_lock, stopping
from genome_jax.errors import UserError
from genome_jax.run_config import (
    RunConfig,
    data_differences,
    describe_mismatch,
    file_digests,
    load_run_config,
    run_config_from_dict,
    save_run_config,
    saved_data_digests,
)
from scripts.scoring import LLMScorer, SyntheticScorer, Timer, _digest, _host

RUN_CONFIG = "run_config.json"


# ------------------------------------------------------------------------------------------------ preparation
def _check_task(name: str, scoring: str | None, splits: tuple[str, ...] = ()) -> None:
    """A task name or file the evaluators know, with the requested scoring mode and valid items in `splits`;
    raises their UserError if not (a bad item must fail here, not after the evaluator has started)."""
    from evaluators.tasks import get_task

    task = get_task(name, mode=scoring)
    for split in splits:
        task.load(split)


def read_saved_config(out_dir: Path) -> RunConfig | None:
    path = out_dir / RUN_CONFIG
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}); is this a genome run folder?") from None
    return run_config_from_dict(data, str(path))


def refuse_if_busy(flags: Mapping[str, Any], *, config_file: str | None = None,
                   resume_dir: str | None = None) -> None:
    """Fail at once (before JAX is even imported) when another live run holds the output folder. Flags that do
    not parse are left to `prepare` to report."""
    folder = resume_dir
    if folder is None:
        try:
            folder = load_run_config(flags, config_file).resolved_output_dir()
        except UserError:
            return
    run_lock.check_free(folder)


def prepare(flags: Mapping[str, Any], *, config_file: str | None = None,
            resume_dir: str | None = None) -> tuple[RunConfig, Path]:
    """Build and validate the run config and decide fresh start vs resume; touches no file.

    Returns (config, output folder). Raises UserError for bad flags/keys, unknown tasks, a folder that is not a
    run of the same config, or --resume on a folder that holds no run.
    """
    base = None
    if resume_dir is not None:
        saved = read_saved_config(Path(resume_dir))
        if saved is None:
            raise UserError(f"--resume {resume_dir}: no {RUN_CONFIG} there (not a genome run folder)")
        base = saved.to_dict()
        flags = {**flags, "output_dir": resume_dir}

    cfg = load_run_config(flags, config_file, base=base)
    # absolute paths: the saved config must mean the same folders when the run is resumed from elsewhere
    cfg = dataclasses.replace(cfg, **{k: str(Path(v).expanduser().absolute()) for k in ("lora_dir", "model_path")
                                      if (v := getattr(cfg, k)) is not None})
    if cfg.eval_devices is not None:  # GPU indices / UUIDs: the evaluators' parser says what is valid
        from evaluators.backends.device_pool import parse_devices

        cfg = dataclasses.replace(cfg, eval_devices=",".join(parse_devices(cfg.eval_devices)))
    if not cfg.synthetic:  # task names, files and scoring modes are the evaluators' to check
        for t in cfg.tasks:
            _check_task(t, cfg.scoring, ("dev", "test"))
        for t in cfg.unseen_tasks:
            _check_task(t, None, ("test",))
    out_dir = cfg.resolved_output_dir()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--output_dir {out_dir}: exists and is not a folder")
        saved = read_saved_config(out_dir)
        if saved is not None:
            diff = describe_mismatch(saved, cfg)
            if diff:
                raise UserError(f"--output_dir {out_dir} holds a run with a different config ({diff}); "
                                "use another --output_dir or the same flags to resume")
        elif set(out_dir.iterdir()) - orphan_temps(out_dir) - {out_dir / run_lock.LOCK_NAME}:  # a killed run's
            # temp files (and its lock file) alone are no content
            raise UserError(f"--output_dir {out_dir}: folder is not empty and holds no genome run")
    validate_more(cfg)
    check_provenance(cfg)
    return cfg, out_dir


def orphan_temps(out_dir: Path) -> set[Path]:
    """Temp files and folders a killed run left in its folder (our writers' names: `.NAME.tmp*` of reports and
    configs, `.best_adapter.tmp-*` / `.old-*` of an adapter export, `.tmp-*` of the result cache). orbax cleans its
    own under checkpoints/."""
    found = {p for p in out_dir.glob(".*") if ".tmp" in p.name or ".old-" in p.name}
    cache = out_dir / "eval_cache"
    if cache.is_dir():
        found |= set(cache.glob(".tmp-*"))
    return found


def _remove_orphan_temps(out_dir: Path) -> None:
    for p in orphan_temps(out_dir):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------- run identity: data digests, last saved generation (issue 15)
def data_files(cfg: RunConfig) -> list[Path]:
    """The files fitness reads: each fitness task's file, and each expert folder's config and weights."""
    from genome_jax.population import adapter_folders

    files: list[Path] = []
    if not cfg.synthetic:
        from evaluators.tasks import get_task

        files += [Path(p) for t in cfg.tasks if (p := getattr(get_task(t, mode=cfg.scoring), "path", None))]
    if cfg.lora_dir is not None:
        files += [f for d in adapter_folders(cfg.lora_dir) for f in sorted(d.iterdir()) if f.is_file()]
    return files


def data_digests(cfg: RunConfig) -> dict[str, str]:
    return file_digests(data_files(cfg))


def check_data(cfg: RunConfig, out_dir: Path, *, allow_change: bool = False) -> list[dict]:
    """Compare the data a saved run started with (run_config.json) with the files now. Raises UserError naming the
    first changed file, unless allow_change (then returns the changes, for result.json). Nothing saved: []."""
    saved = _read_json(out_dir / RUN_CONFIG)
    was = saved_data_digests(saved) if isinstance(saved, dict) else None
    if was is None:
        return []
    changes = data_differences(was, data_digests(cfg))
    if changes and not allow_change:
        c = changes[0]
        how = ("is new (not part of it)" if c["was"] == "absent" else
               "is gone" if c["now"] in ("missing", "absent") else "changed")
        more = f" (and {len(changes) - 1} more file(s))" if len(changes) > 1 else ""
        raise UserError(f"{c['file']} {how} since the run in {out_dir} started{more}; restore it, use another "
                        "--output_dir, or resume anyway with --allow-data-change")
    return changes


def _saved_identity(out_dir: Path) -> dict:
    from genome_jax.checkpoint import CONFIG_NAME

    d = _read_json(out_dir / "checkpoints" / CONFIG_NAME)
    return d if isinstance(d, dict) else {}


def last_saved_generation(out_dir: Path) -> int | None:
    """The newest complete checkpoint step of a run folder (orbax renames a step into place when it is whole)."""
    ck = out_dir / "checkpoints"
    steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit() and p.is_dir()] if ck.is_dir() else []
    return max(steps) if steps else None


def validate_more(cfg: RunConfig) -> None:
    """Checks that need the strategies and the expert folder listing (still no file written, no weights read)."""
    from genome_jax.population import adapter_folders
    from genome_jax.run_config import strategy_params

    params = strategy_params(cfg)
    n_experts = len(adapter_folders(cfg.lora_dir)) if cfg.lora_dir else _SYNTHETIC_EXPERTS
    if not cfg.init_merge and n_experts > params.population_size:
        raise UserError(f"--no-init-merge keeps all {n_experts} experts as the initial population, but "
                        f"--population_size is {params.population_size}")
    if cfg.init_merge and n_experts < 2:
        raise UserError(f"--lora_dir {cfg.lora_dir}: one expert only; the initial merges need at least 2 "
                        "(or use --no-init-merge)")
    if cfg.devices:
        population_mesh(cfg, params)  # raises UserError: more devices than JAX sees, or a size that does not split
    if cfg.backend == "jax" and not cfg.synthetic:
        for t in cfg.tasks:
            from evaluators.tasks import CHOICE_LOGPROB, LOGLIK, get_task

            if get_task(t, mode=cfg.scoring).mode not in (CHOICE_LOGPROB, LOGLIK):
                raise UserError(f"--backend jax scores multiple-choice tasks with choice_logprob or loglik only; "
                                f"task '{t}' uses '{get_task(t, mode=cfg.scoring).mode}'")


_SYNTHETIC_EXPERTS = 4  # genome_jax.synthetic.synthetic_experts' default pool size


# --------------------------------------------------------------------------------------------------- leakage
def _task_items(name: str) -> dict[str, list]:
    """{split: items} of a task's dev and test splits (those its file holds)."""
    from evaluators.tasks import get_task
    from evaluators.tasks.loading import read_task_file, splits_of

    task = get_task(name)
    path = getattr(task, "path", None)
    have = splits_of(read_task_file(path), path) if path else ("dev", "test")
    return {s: task.load(s) for s in ("dev", "test") if s in have}


def provenance_report(cfg: RunConfig) -> dict | None:
    """What the experts were trained on, against the dev/test items of the run's tasks (evaluators.provenance):
    {"allow_overlap", "adapters": {expert: known | unknown | unparseable}, "unparseable": {expert: why},
    "overlaps": [...]}. None without --lora_dir (synthetic experts). Reads small files only."""
    if cfg.lora_dir is None:
        return None
    from evaluators import provenance
    from genome_jax.population import adapter_folders

    adapters = {p.name: p for p in adapter_folders(cfg.lora_dir)}
    read = {name: provenance.read_provenance(p) for name, p in adapters.items()}
    tasks = () if cfg.synthetic else tuple(dict.fromkeys(cfg.tasks + cfg.test_tasks))
    return {"allow_overlap": cfg.allow_overlap,
            "adapters": {name: r["status"] for name, r in read.items()},
            "unparseable": {name: r["error"] for name, r in read.items() if r["status"] == provenance.UNPARSEABLE},
            "overlaps": provenance.find_overlaps(adapters, {t: _task_items(t) for t in tasks})}


def check_provenance(cfg: RunConfig) -> None:
    """Refuse (UserError, one line) a run whose target or test task has dev/test items an expert was trained on,
    unless --allow-overlap. An unparseable provenance file is reported on stderr (one line) and not trusted."""
    from evaluators.provenance import overlap_message

    report = provenance_report(cfg)
    if report is None:
        return
    for name, why in report["unparseable"].items():
        print(f"genome: warning: expert '{name}': provenance not trusted ({why})", file=sys.stderr, flush=True)
    if not report["overlaps"]:
        return
    if not cfg.allow_overlap:
        raise UserError(f"{overlap_message(report['overlaps'])}: its scores there would be leaked; use experts not "
                        "trained on the run's tasks, or pass --allow-overlap to run anyway")
    print(f"genome: warning: --allow-overlap: {overlap_message(report['overlaps'])} (recorded in result.json)",
          file=sys.stderr, flush=True)


def population_mesh(cfg: RunConfig, params):
    """The mesh of `--devices` (None when 0: unsharded): the first N local devices (-1: all), one axis "pop".
    Raises UserError when N exceeds the local devices or a population size of the method does not split over N."""
    if not cfg.devices:
        return None
    import jax

    from genome_jax import sharding
    from genome_jax.run_config import devices_label
    from genome_jax.strategies import get_strategy

    label = devices_label(cfg.devices)
    local = jax.local_devices()
    if cfg.devices > len(local):
        raise UserError(f"--devices {label}: JAX sees {len(local)} local device(s) here "
                        f"({local[0].platform}); use at most {len(local)}, or 0 for unsharded")
    mesh = sharding.population_mesh(local, n_devices=None if cfg.devices == -1 else cfg.devices)
    try:
        sharding.check_divisible(sharding.population_sizes(get_strategy(cfg.method), params), mesh)
    except UserError as e:
        raise UserError(f"--devices {label}: {e}") from None
    return mesh


# -------------------------------------------------------------------------------------------------------- run
EXPERTS = "experts.json"
BEST_ADAPTER = "best_adapter"


def _load_experts(cfg: RunConfig):
    """The parent pool as a Population (synthetic without --lora_dir: small random experts)."""
    from genome_jax.population import Population, PopulationMeta, load_population

    if cfg.lora_dir is not None:
        return load_population(cfg.lora_dir)
    from genome_jax import synthetic

    factors = synthetic.synthetic_experts(cfg.seed)
    leaf = next(iter(factors.values()))
    meta = PopulationMeta(base_model="synthetic", rank=int(leaf["A"].shape[1]),
                          target_modules=tuple(sorted({p.rsplit(".", 1)[-1] for p in factors})),
                          names=tuple(f"synthetic-expert-{i}" for i in range(leaf["A"].shape[0])))
    return Population(factors=factors, meta=meta)


def _identity(cfg: RunConfig, params, experts) -> dict:
    from genome_jax.synthetic import experts_digest

    return {"run": cfg.identity(), "params": params.to_dict(), "experts": experts_digest(experts.factors)}


def _stats_record(generation: int, fitness, best_ever, evaluated: dict, times: dict, elapsed: float) -> dict:
    from genome_jax import reporting

    s = reporting.fitness_stats([float(f) for f in fitness])
    return {"generation": generation, **s, "best_ever": reporting.clean_float(best_ever),
            "population": int(sum(1 for f in fitness if f == f)), "evaluated": evaluated, "time": times,
            "elapsed_s": round(elapsed, 3)}


def run(cfg: RunConfig, out_dir: Path, *, progress: bool = True, log=print,
        data_changes: list[dict] | None = None) -> dict:
    """Run (or resume) the evolution described by `cfg` in `out_dir`; returns the result dict (also result.json).
    One writer per folder: raises UserError at once when another live run holds `out_dir` (genome_jax.run_lock).
    data_changes: what `check_data` found changed and --allow-data-change accepted (recorded in result.json)."""
    created = not out_dir.exists()
    had_lock_file = (out_dir / run_lock.LOCK_NAME).exists()
    try:
        with run_lock.hold(out_dir):
            return _run(cfg, out_dir, progress=progress, log=log, created=created, data_changes=data_changes)
    except BaseException:  # refused before writing anything (e.g. experts that do not fit the model): leave no trace
        if not had_lock_file and not (out_dir / RUN_CONFIG).exists():
            (out_dir / run_lock.LOCK_NAME).unlink(missing_ok=True)
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _run(cfg: RunConfig, out_dir: Path, *, progress: bool, log, created: bool, data_changes: list[dict] | None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from genome_jax import reporting
    from genome_jax.checkpoint import RunCheckpointer
    from genome_jax.run_config import strategy_params
    from genome_jax.strategies import get_strategy, initial_population, needs_score

    t_start = time.perf_counter()
    timer = Timer()
    _enable_compilation_cache()
    params = strategy_params(cfg)
    provenance = provenance_report(cfg)  # the experts' training data vs the run's tasks, for result.json
    plain = get_strategy(cfg.method)
    mesh = population_mesh(cfg, params)  # --devices N: the population axis sharded over N local devices
    if mesh is None:
        strategy = plain
    else:
        from genome_jax.sharding import ShardedStrategy

        strategy = ShardedStrategy(plain, mesh, params)
    with timer("load"):
        experts = _load_experts(cfg)
        model_path = None if cfg.synthetic else (cfg.model_path or _default_model_path())
        if model_path is not None:
            _check_experts_fit_model(experts, cfg.lora_dir, model_path)
    meta = experts.meta
    identity = _identity(cfg, params, experts)
    if data_changes:  # --allow-data-change: changed experts keep the run's identity (the user vouched for them)
        identity["experts"] = _saved_identity(out_dir).get("experts", identity["experts"])

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_orphan_temps(out_dir)  # left by a killed run of this folder (one run per folder at a time)
    scorer = None
    try:
        if not (out_dir / RUN_CONFIG).exists():
            save_run_config(cfg, out_dir / RUN_CONFIG, data=data_digests(cfg))
        ckpt = RunCheckpointer(out_dir / "checkpoints", identity)
        with timer("evaluator_start"):
            if cfg.synthetic:
                scorer = SyntheticScorer(experts.factors, cfg.seed)
            else:
                scorer = LLMScorer(cfg, model_path, meta.rank, out_dir / "eval_cache", progress)
    except BaseException:
        if scorer is not None:
            scorer.close()
        if created:  # nothing of value was written yet: leave no half-made run folder behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise

    try:
        t_evo = time.perf_counter()
        at_evolution = dict(timer.total)
        key = jax.random.PRNGKey(cfg.seed)
        k_init, k_run = jax.random.split(key)
        n0 = params.population_size

        def template():  # the state's structure: a zero population through init
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros((n0,) + a.shape[1:], a.dtype), experts.factors)
            return plain.init(k_run, zeros, jnp.zeros((n0,), jnp.float32), params)

        if mesh is None:
            target = template()
        else:  # shapes only, carrying this run's shardings: a checkpoint saved on any device count lands split
            target = strategy.abstract(jax.eval_shape(template))
        restored = ckpt.restore_latest(target)
        experts_info = _read_json(out_dir / EXPERTS)
        if restored is None:
            reporting.truncate_metrics(out_dir, -1)
            before = dict(timer.total)
            if experts_info is None:  # the parents' own dev fitness: for "best initial expert" in the report
                fit = scorer.dev_fitness(experts.factors, list(range(experts.size)), meta, timer, progress)
                experts_info = {"names": list(meta.names), "dev_fitness": [reporting.clean_float(f) for f in fit]}
                reporting.write_json_atomic(out_dir / EXPERTS, experts_info)
            with timer("operators"):
                pop0 = initial_population(k_init, experts.factors, n0, params=params, init_merge=cfg.init_merge)
                jax.block_until_ready(pop0)
            hits = scorer.cache_hits
            fit0 = scorer.dev_fitness(pop0, list(range(n0)), meta, timer, progress)
            hits = scorer.cache_hits - hits
            with timer("operators"):
                state = strategy.init(k_run, pop0, jnp.asarray(fit0, jnp.float32), params)
                jax.block_until_ready(state)
            rec = _stats_record(0, np.asarray(state.fitness), state.best_fitness,
                                {"scored": n0 - hits, "cached": hits, "cache_hits": hits}, {},
                                time.perf_counter() - t_start)
            with timer("checkpoint"), stopping.deferred():  # a signal waits until orbax holds the step
                ckpt.save(0, state)
            faults.point("checkpoint_in_flight")
            faults.point("checkpoint_committed", before_kill=ckpt.wait)
            rec["time"] = timer.since(before)
            reporting.append_metrics(out_dir, rec)
            faults.point("metrics_appended")
            log(reporting.summary_line(rec, cfg.max_iter))
            resumed_from = None
        else:
            state, resumed_from = restored.state, restored.step
            reporting.truncate_metrics(out_dir, restored.step)
            if not any(r.get("generation") == restored.step for r in reporting.read_metrics(out_dir)):
                # killed after the checkpoint committed but before its metrics line: rebuild it from the state
                # (fitness columns exact; evaluated/time of that generation are lost)
                reporting.append_metrics(out_dir, {**_stats_record(restored.step, np.asarray(state.fitness),
                                                                   state.best_fitness, {}, {}, 0.0), "rebuilt": True})
            log(f"resuming {out_dir} from generation {restored.step}")
            if experts_info is None:
                fit = scorer.dev_fitness(experts.factors, list(range(experts.size)), meta, timer, progress)
                experts_info = {"names": list(meta.names), "dev_fitness": [reporting.clean_float(f) for f in fit]}
                reporting.write_json_atomic(out_dir / EXPERTS, experts_info)

        while int(state.generation) < cfg.max_iter and not strategy.done(state, params):
            before = dict(timer.total)
            with timer("operators"):
                children, state = strategy.ask(strategy.generation_key(state), state, params)
                need = np.asarray(needs_score(state))
            idx = [int(i) for i in np.flatnonzero(need)]
            fitness = np.full(need.shape, np.nan, np.float32)
            hits = scorer.cache_hits
            if idx:
                fitness[idx] = scorer.dev_fitness(children, idx, meta, timer, progress)
            with timer("operators"):
                state = strategy.tell(state, children, jnp.asarray(fitness), params)
                jax.block_until_ready(state)
            hits = scorer.cache_hits - hits
            g = int(state.generation)
            alive = getattr(state, "child_alive", None)
            n_alive = int(np.sum(np.asarray(alive))) if alive is not None else int(need.shape[0])
            with timer("checkpoint"), stopping.deferred():
                ckpt.save(g, state)
            faults.point("checkpoint_in_flight")
            faults.point("checkpoint_committed", before_kill=ckpt.wait)
            rec = _stats_record(g, np.asarray(state.fitness), state.best_fitness,
                                {"scored": len(idx) - hits, "cached": n_alive - len(idx) + hits, "cache_hits": hits},
                                timer.since(before),
                                time.perf_counter() - t_start)
            reporting.append_metrics(out_dir, rec)
            faults.point("metrics_appended")
            log(reporting.summary_line(rec, cfg.max_iter))
        with timer("checkpoint"):
            ckpt.close()
        stopped_early = int(state.generation) < cfg.max_iter
        evolution = {**timer.since(at_evolution), "total": round(time.perf_counter() - t_evo, 3)}
        at_final, t_final = dict(timer.total), time.perf_counter()
        result = _final_report(cfg, out_dir, state, experts, experts_info, scorer, timer, progress)
        result.update(generations=int(state.generation), stopped_early=stopped_early, resumed_from=resumed_from,
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


def _check_experts_fit_model(experts, lora_dir, model_path: str) -> None:
    """Every expert's ΔW must have the shape of the base weight of the same name, read from the model's
    safetensors headers (no weights loaded): adapters made for another model are refused before the evaluator
    starts."""
    from safetensors import safe_open

    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (root / "model.safetensors").is_file():
            files = [root / "model.safetensors"]
        else:
            return  # another checkpoint format: the evaluator checks when it loads the adapters
        shapes = {}
        for f in files:
            with safe_open(str(f), framework="numpy") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
    except Exception as e:  # unreadable checkpoint: say which, in one line
        raise UserError(f"--model_path {model_path}: cannot read the model's weights index ({e})") from None
    for path, leaf in experts.factors.items():
        want = shapes.get(f"{path}.weight")
        got = (int(leaf["B"].shape[1]), int(leaf["A"].shape[2]))
        if want is None:  # the checkpoint may name its weights otherwise (the evaluator maps them): not ours to judge
            continue
        if tuple(want) != got:
            raise UserError(f"--lora_dir {lora_dir}: the experts' ΔW for {path} is {got[0]} x {got[1]} but the "
                            f"weight of --model_path {model_path} is {want[0]} x {want[1]} (adapters made for another "
                            "model?)")


def _enable_compilation_cache() -> None:
    """Persist XLA compilations (ask/tell/score) across runs: a resumed or repeated run skips recompiling.
    See genome_jax.compile_cache (GENOME_JAX_COMPILE_CACHE=DIR moves it, =0 turns it off)."""
    from genome_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache()


def _default_model_path() -> str:
    from genome_jax.model_store import default_model_path

    return str(default_model_path())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _export_best(best_factors, meta, out_dir: Path) -> Path:
    """out_dir/best_adapter: the best individual ever seen, as a PEFT folder (atomic replace)."""
    import numpy as np

    from genome_jax.population import Population, export_adapter

    one = {m: {k: np.asarray(v)[None] for k, v in leaf.items()} for m, leaf in _host(best_factors).items()}
    return export_adapter(Population(factors=one, meta=dataclasses.replace(meta, names=("best",))), 0,
                          out_dir / BEST_ADAPTER)


def _final_report(cfg: RunConfig, out_dir: Path, state, experts, experts_info: dict, scorer, timer: Timer,
                  progress: bool) -> dict:
    """best_adapter/, test scores (best, best initial expert, top-k ensembles ranked on dev), fitness.png."""
    import numpy as np

    from genome_jax import reporting

    meta = experts.meta
    with timer("export"):
        _export_best(state.best, meta, out_dir)
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
    import jax
    import numpy as np

    from evaluators.ensemble import DevRanking, ensemble, ensemble_task
    from evaluators.tasks import weighted_fitness

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
