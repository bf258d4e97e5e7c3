"""`genome run` before the run: the config from flags, files and a saved run, the checks that need the evaluators'
task registry or the expert folders, leakage (provenance), and the run folder's identity. Touches no file.

Wiring only: the rules live in genome_jax.run_config and the evaluators' registries.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
from safetensors import safe_open

from evaluators import provenance
from evaluators.backends.device_pool import parse_devices
from evaluators.provenance import overlap_message
from evaluators.tasks import CHOICE_LOGPROB, LOGLIK, get_task
from evaluators.tasks.loading import read_task_file, splits_of
from genome_jax import run_lock, sharding
from genome_jax.checkpoint import CONFIG_NAME
from genome_jax.errors import UserError
from genome_jax.population import adapter_folders
from genome_jax.run_config import (
    RunConfig,
    data_differences,
    describe_mismatch,
    devices_label,
    file_digests,
    load_run_config,
    run_config_from_dict,
    saved_data_digests,
)
from genome_jax.strategies import strategy_params

RUN_CONFIG = "run_config.json"


# ------------------------------------------------------------------------------------------------ preparation
def _check_task(name: str, scoring: str | None, splits: tuple[str, ...] = ()) -> None:
    """A task name or file the evaluators know, with the requested scoring mode and valid items in `splits`;
    raises their UserError if not (a bad item must fail here, not after the evaluator has started)."""
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


def remove_orphan_temps(out_dir: Path) -> None:
    for p in orphan_temps(out_dir):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------- run identity: data digests, last saved generation (issue 15)
def data_files(cfg: RunConfig) -> list[Path]:
    """The files fitness reads: each fitness task's file, and each expert folder's config and weights."""
    files: list[Path] = []
    if not cfg.synthetic:
            files += [Path(p) for t in cfg.tasks if (p := getattr(get_task(t, mode=cfg.scoring), "path", None))]
    if cfg.lora_dir is not None:
        files += [f for d in adapter_folders(cfg.lora_dir) for f in sorted(d.iterdir()) if f.is_file()]
    return files


def data_digests(cfg: RunConfig) -> dict[str, str]:
    return file_digests(data_files(cfg))


def check_data(cfg: RunConfig, out_dir: Path, *, allow_change: bool = False) -> list[dict]:
    """Compare the data a saved run started with (run_config.json) with the files now. Raises UserError naming the
    first changed file, unless allow_change (then returns the changes, for result.json). Nothing saved: []."""
    saved = read_json(out_dir / RUN_CONFIG)
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


def saved_identity(out_dir: Path) -> dict:
    d = read_json(out_dir / "checkpoints" / CONFIG_NAME)
    return d if isinstance(d, dict) else {}


def last_saved_generation(out_dir: Path) -> int | None:
    """The newest complete checkpoint step of a run folder (orbax renames a step into place when it is whole)."""
    ck = out_dir / "checkpoints"
    steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit() and p.is_dir()] if ck.is_dir() else []
    return max(steps) if steps else None


def validate_more(cfg: RunConfig) -> None:
    """Checks that need the strategies and the expert folder listing (still no file written, no weights read)."""
    strategy, _ = strategy_params(cfg)
    n_experts = len(adapter_folders(cfg.lora_dir)) if cfg.lora_dir else _SYNTHETIC_EXPERTS
    if not cfg.init_merge and n_experts > strategy.population_size:
        raise UserError(f"--no-init-merge keeps all {n_experts} experts as the initial population, but "
                        f"--population_size is {strategy.population_size}")
    if cfg.init_merge and n_experts < 2:
        raise UserError(f"--lora_dir {cfg.lora_dir}: one expert only; the initial merges need at least 2 "
                        "(or use --no-init-merge)")
    if cfg.devices:
        population_mesh(cfg, strategy)  # raises UserError: more devices than JAX sees, or a size that does not split
    if cfg.backend == "jax" and not cfg.synthetic:
        for t in cfg.tasks:
            if get_task(t, mode=cfg.scoring).mode not in (CHOICE_LOGPROB, LOGLIK):
                raise UserError(f"--backend jax scores multiple-choice tasks with choice_logprob or loglik only; "
                                f"task '{t}' uses '{get_task(t, mode=cfg.scoring).mode}'")


_SYNTHETIC_EXPERTS = 4  # genome_jax.synthetic.synthetic_experts' default pool size


# --------------------------------------------------------------------------------------------------- leakage
def _task_items(name: str) -> dict[str, list]:
    """{split: items} of a task's dev and test splits (those its file holds)."""
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


def population_mesh(cfg: RunConfig, strategy):
    """The mesh of `--devices` (None when 0: unsharded): the first N local devices (-1: all), one axis "pop".
    Raises UserError when N exceeds the local devices or a population size of the method does not split over N."""
    if not cfg.devices:
        return None
    label = devices_label(cfg.devices)
    local = jax.local_devices()
    if cfg.devices > len(local):
        raise UserError(f"--devices {label}: JAX sees {len(local)} local device(s) here "
                        f"({local[0].platform}); use at most {len(local)}, or 0 for unsharded")
    mesh = sharding.population_mesh(local, n_devices=None if cfg.devices == -1 else cfg.devices)
    try:
        sharding.check_divisible(strategy.population_sizes, mesh)
    except UserError as e:
        raise UserError(f"--devices {label}: {e}") from None
    return mesh



def check_experts_fit_model(experts, lora_dir, model_path: str) -> None:
    """Every expert's ΔW must have the shape of the base weight of the same name, read from the model's
    safetensors headers (no weights loaded): adapters made for another model are refused before the evaluator
    starts."""
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


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


