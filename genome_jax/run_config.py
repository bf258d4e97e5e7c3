"""The configuration of one `genome run`: a frozen dataclass, loaded from defaults < config file < flags.

Keys are the `genome run` flag names without dashes (`population_size`, `task_weights`, ...), in YAML or TOML.
Validation happens here, before any work: every problem is a `UserError` whose one-line message names the key.
Task names are checked by the caller (genome_jax never imports evaluators): pass `task_exists`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from genome_jax.errors import UserError
from genome_jax.model_store import sha256_file

METHODS = ("genome", "genome_plus")
BACKENDS = ("vllm", "jax")
SCORINGS = ("generate", "choice_logprob", "loglik")
EVAL_MODES = ("auto", "swap", "lora")  # the vLLM evaluator's routes: W+ΔW weight swap, multi-LoRA, or per platform
EVAL_DTYPES = ("auto", "bfloat16", "float16", "float32")  # vLLM engine dtype (auto: the checkpoint's own)
SYNTHETIC = "synthetic"  # the test problem: fitness from the weights themselves, no LLM


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Defaults follow the GENOME reference scripts."""

    tasks: tuple[str, ...]
    task_weights: tuple[float, ...] | None = None  # None: equal weights; normalised to sum 1 by `weights`
    test_tasks: tuple[str, ...] = ()  # reported on the test split at the end; those not in `tasks` are "unseen"
    model_path: str | None = None  # None: the embedded SmolLM2-135M (genome_jax.model_store)
    lora_dir: str | None = None  # folder of PEFT expert folders (the parents)
    method: str = "genome"
    combine_method: str = "ties"  # merge used to build the initial population from pairs of experts
    cross_method: str = "ties"  # merge used by crossover
    population_size: int = 10
    max_population_size: int | None = None  # genome_plus: the population grows up to this (None: 2 x size)
    max_iter: int = 50
    cross_rate: float = 0.8
    individual_mutation_rate: float = 0.15
    gene_mutation_rate: float = 0.01
    sigma: float = 0.01
    elite_percent: float = 0.02
    early_stop_iter: int = 0  # stop after this many generations without a better best (0: never)
    init_merge: bool = True  # False (--no-init-merge): the experts themselves are the initial population
    seed: int = 42
    output_dir: str | None = None  # None: runs/<method>-<tasks>-s<seed> (deterministic, so a re-run resumes)
    n_dev: int | None = 200  # dev samples per task for fitness (None: all)
    n_test: int | None = None  # test samples per task for the final report (None: all)
    scoring: str | None = None  # None: each task's default scoring mode
    backend: str = "vllm"
    eval_mode: str = "auto"  # vLLM route: swap (W+ΔW into the live engine) | lora (multi-LoRA) | auto (per platform)
    eval_dtype: str = "auto"  # vLLM engine dtype: auto (the model's, bf16 for SmolLM2) | float32 (exactness) | ...
    endpoints: tuple[str, ...] = ()  # external OpenAI-compatible vLLM servers instead of the managed process
    ensemble_k: int = 5  # ensembles of the top-k individuals (dev ranking), k = 1..ensemble_k
    allow_overlap: bool = False  # run although an expert was trained on dev/test items of a run's task (leakage)
    # placement (where the work runs, never what it computes; a resumed run may change them):
    devices: int = 0  # local JAX devices the population axis is sharded over (0: unsharded, -1: all of them)
    eval_devices: str | None = None  # "0,1,2,3": one managed vLLM worker per GPU
    ray_address: str | None = None  # "local" | "auto" | "ray://host:port": one vLLM engine per Ray actor
    ray_actors: int | None = None  # Ray actors (None: one per GPU of the cluster, or per CPU without GPUs)

    @property
    def weights(self) -> tuple[float, ...]:
        """Task weights normalised to sum 1 (equal when not given)."""
        w = self.task_weights or tuple(1.0 for _ in self.tasks)
        s = sum(w)
        return tuple(x / s for x in w)

    @property
    def synthetic(self) -> bool:
        return self.tasks == (SYNTHETIC,)

    @property
    def unseen_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.test_tasks if t not in self.tasks)

    @property
    def report_tasks(self) -> tuple[str, ...]:
        """Tasks scored on the test split at the end: the fitness tasks, then the unseen ones."""
        return () if self.synthetic else self.tasks + self.unseen_tasks

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        slug = re.sub(r"[^A-Za-z0-9_.]+", "_", "+".join(Path(t).stem for t in self.tasks))[:60]
        return Path("runs") / f"{self.method}-{slug}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def identity(self) -> dict[str, Any]:
        """The fields that decide the evolution's trajectory: a checkpoint is only resumed under the same identity."""
        d = self.to_dict()
        for k in RESUME_MAY_CHANGE:
            d.pop(k)
        return d


# Fields that may differ when a run is resumed: what is reported after the search, not the search itself.
# max_iter may grow: `genome run --resume DIR --max_iter N` extends a finished run (the state holds no history).
# Placement settings (devices, evaluator engines) move the work, not the search: a run may resume on other hardware.
RESUME_MAY_CHANGE = ("output_dir", "max_iter", "test_tasks", "n_test", "ensemble_k", "endpoints", "eval_mode", "eval_dtype",
                     "allow_overlap",
                     "devices", "eval_devices", "ray_address", "ray_actors")

# key -> kind, for type checking values from a config file (flags are typed by argparse already)
_KINDS: dict[str, str] = {
    "tasks": "str_list",
    "task_weights": "float_list?",
    "test_tasks": "str_list",
    "model_path": "str?",
    "lora_dir": "str?",
    "method": "str",
    "combine_method": "str",
    "cross_method": "str",
    "population_size": "int",
    "max_population_size": "int?",
    "max_iter": "int",
    "cross_rate": "float",
    "individual_mutation_rate": "float",
    "gene_mutation_rate": "float",
    "sigma": "float",
    "elite_percent": "float",
    "early_stop_iter": "int",
    "init_merge": "bool",
    "seed": "int",
    "output_dir": "str?",
    "n_dev": "int?",
    "n_test": "int?",
    "scoring": "str?",
    "backend": "str",
    "eval_mode": "str",
    "eval_dtype": "str",
    "endpoints": "str_list",
    "ensemble_k": "int",
    "allow_overlap": "bool",
    "devices": "devices",
    "eval_devices": "device_list?",
    "ray_address": "str?",
    "ray_actors": "int?",
}
assert set(_KINDS) == {f.name for f in dataclasses.fields(RunConfig)}
_ALIASES = {"no_init_merge": "init_merge", "iters": "max_iter"}  # flag spellings accepted in config files


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check one value's type against its key's kind; lists become tuples. Raises UserError naming key and file."""
    kind = _KINDS[key]
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: '{key}' must not be empty")

    def bad(expected: str) -> UserError:
        return UserError(f"{where}: '{key}' must be {expected}, got {type(value).__name__} {value!r}")

    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind == "devices":  # a count, or "all" (-1)
        if isinstance(value, str) and value.strip().lower() == "all":
            return -1
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer or 'all'")
        return value
    if kind == "device_list":  # "0,1,2,3", a single index, or a list of indices / UUIDs -> "0,1,2,3"
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                    for v in value):
            return ",".join(str(v) for v in value)
        raise bad("a comma-separated list of devices such as 0,1,2,3")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind in ("str_list", "float_list"):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single task or weight may be written without brackets
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        out = []
        for v in value:
            if kind == "str_list" and not isinstance(v, str):
                raise bad("a list of strings")
            if kind == "float_list" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise bad("a list of numbers")
            out.append(float(v) if kind == "float_list" else v)
        return tuple(out)
    raise AssertionError(kind)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of run keys; returns the raw mapping (checked later)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise UserError(f"--config {path}: unknown format '{suffix}' (use .yaml, .yml or .toml)")
    except UserError:
        raise
    except Exception as e:  # the parsers' own messages carry line and column
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--config {path}: cannot parse: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of keys to values at the top level")
    return data


def _normalise_keys(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k == "no_init_merge":
            if not isinstance(value, bool):
                raise UserError(f"{where}: 'no_init_merge' must be true or false, got {value!r}")
            value = not value
        k = _ALIASES.get(k, k)
        if k not in _KINDS:
            close = [c for c in _KINDS if c.startswith(k[:4])] if len(k) >= 4 else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}: unknown key '{key}'{hint}")
        if k in out:
            raise UserError(f"{where}: key '{key}' given twice")
        out[k] = _coerce(k, value, where)
    return out


def load_run_config(
    flags: Mapping[str, Any],
    config_file: str | os.PathLike | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    task_exists: Callable[[str], bool] | None = None,
    merge_methods: tuple[str, ...] | None = None,
) -> RunConfig:
    """defaults < base < config file < flags. `flags` holds only the flags the user gave (None means not given);
    `base` is a saved config (resume: `run_config.json` of the run folder).

    task_exists: name -> bool, checks task names (the CLI passes the evaluators' registry); merge_methods: the
    crossover methods known to genome_jax.operators.merge. Returns a validated RunConfig or raises UserError.
    """
    values: dict[str, Any] = {}
    if base is not None:
        values.update(_normalise_keys(base, "saved run config"))
    if config_file is not None:
        values.update(_normalise_keys(read_config_file(config_file), f"--config {config_file}"))
    given = {k: v for k, v in flags.items() if v is not None}
    values.update(_normalise_keys(given, "flags"))
    if "tasks" not in values:
        raise UserError("--tasks is required (e.g. --tasks mmlu gsm8k arc_c, or --tasks synthetic)")
    cfg = RunConfig(**values)
    validate(cfg, task_exists=task_exists, merge_methods=merge_methods)
    return cfg


def devices_label(n: int) -> str:
    return "all" if n == -1 else str(n)


_RAY_ADDRESS = re.compile(r"^(local|auto|ray://[^\s/:]+(:\d+)?|[^\s/:]+:\d+)$")
_DEVICE_LIST = re.compile(r"^\s*[^,\s]+\s*(,\s*[^,\s]+\s*)*$")


def _check_rate(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise UserError(f"--{name} must be in [0, 1], got {value}")


def validate(
    cfg: RunConfig,
    *,
    task_exists: Callable[[str], bool] | None = None,
    merge_methods: tuple[str, ...] | None = None,
) -> None:
    """Raise UserError (one line, naming the flag) for any invalid value or combination; touches no file."""
    if not cfg.tasks:
        raise UserError("--tasks needs at least one task")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise UserError(f"--tasks lists a task twice: {' '.join(cfg.tasks)}")
    if SYNTHETIC in cfg.tasks and len(cfg.tasks) > 1:
        raise UserError("--tasks synthetic is a test problem and cannot be mixed with real tasks")
    if cfg.synthetic and cfg.test_tasks:
        raise UserError("--test_tasks cannot be used with --tasks synthetic (the test problem has no test split)")
    if cfg.task_weights is not None:
        if len(cfg.task_weights) != len(cfg.tasks):
            raise UserError(
                f"--task_weights has {len(cfg.task_weights)} value(s) but --tasks has {len(cfg.tasks)}: "
                "give one weight per task"
            )
        if any(not math.isfinite(w) or w < 0 for w in cfg.task_weights):
            raise UserError(f"--task_weights must be finite and >= 0, got {' '.join(map(str, cfg.task_weights))}")
        if sum(cfg.task_weights) <= 0:
            raise UserError("--task_weights must not all be 0")
    if task_exists is not None:
        for t in cfg.tasks + cfg.test_tasks:
            if t != SYNTHETIC and not task_exists(t):
                raise UserError(f"unknown task '{t}' (not a registered task name nor a task file)")
    if SYNTHETIC in cfg.test_tasks:
        raise UserError("--test_tasks cannot include 'synthetic'")
    if cfg.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{cfg.method}'")
    for name in ("combine_method", "cross_method"):
        value = getattr(cfg, name)
        if merge_methods is not None and value not in merge_methods:
            raise UserError(f"--{name} must be one of {', '.join(merge_methods)}, got '{value}'")
    if cfg.population_size < 2:
        raise UserError(f"--population_size must be at least 2, got {cfg.population_size}")
    if cfg.max_population_size is not None:
        if cfg.method != "genome_plus":
            raise UserError("--max_population_size only applies to --method genome_plus")
        if cfg.max_population_size < cfg.population_size:
            raise UserError(
                f"--max_population_size ({cfg.max_population_size}) must be >= --population_size "
                f"({cfg.population_size})"
            )
    if cfg.max_iter < 1:
        raise UserError(f"--max_iter must be at least 1, got {cfg.max_iter}")
    for name in ("cross_rate", "individual_mutation_rate", "gene_mutation_rate", "elite_percent"):
        _check_rate(name, getattr(cfg, name))
    if not math.isfinite(cfg.sigma) or cfg.sigma < 0:
        raise UserError(f"--sigma must be finite and >= 0, got {cfg.sigma}")
    if cfg.early_stop_iter < 0:
        raise UserError(f"--early_stop_iter must be >= 0, got {cfg.early_stop_iter}")
    if cfg.seed < 0:
        raise UserError(f"--seed must be >= 0, got {cfg.seed}")
    for name in ("n_dev", "n_test"):
        n = getattr(cfg, name)
        if n is not None and n < 1:
            raise UserError(f"--{name} must be at least 1, got {n}")
    if cfg.ensemble_k < 1:
        raise UserError(f"--ensemble_k must be at least 1, got {cfg.ensemble_k}")
    if cfg.scoring is not None and cfg.scoring not in SCORINGS:
        raise UserError(f"--scoring must be one of {', '.join(SCORINGS)}, got '{cfg.scoring}'")
    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got '{cfg.backend}'")
    if cfg.eval_mode not in EVAL_MODES:
        raise UserError(f"--eval_mode must be one of {', '.join(EVAL_MODES)}, got '{cfg.eval_mode}'")
    if cfg.eval_dtype not in EVAL_DTYPES:
        raise UserError(f"--eval_dtype must be one of {', '.join(EVAL_DTYPES)}, got '{cfg.eval_dtype}'")
    if cfg.endpoints and cfg.backend != "vllm":
        raise UserError("--endpoints needs --backend vllm")
    for url in cfg.endpoints:
        if not re.match(r"^https?://[^\s/]+", url):
            raise UserError(f"--endpoints: '{url}' is not an http(s):// URL")
    _validate_placement(cfg)
    if not cfg.synthetic:
        if cfg.lora_dir is None:
            raise UserError("--lora_dir is required: a folder of PEFT LoRA expert folders")
    if cfg.lora_dir is not None and not Path(cfg.lora_dir).is_dir():
        raise UserError(f"--lora_dir {cfg.lora_dir}: no such folder")
    if cfg.model_path is not None and not cfg.synthetic and not Path(cfg.model_path).is_dir():
        raise UserError(f"--model_path {cfg.model_path}: no such folder")
    if cfg.model_path is not None and not cfg.synthetic:
        model_config = Path(cfg.model_path) / "config.json"
        if not model_config.is_file():
            raise UserError(f"--model_path {cfg.model_path}: no config.json there (not a Hugging Face model folder)")
        try:
            auto_map = json.loads(model_config.read_text()).get("auto_map")
        except (ValueError, AttributeError, OSError):
            raise UserError(f"{model_config}: not a readable JSON object") from None
        if auto_map:  # custom modelling code is never run (trust_remote_code stays off)
            raise UserError(f"{model_config}: the model needs custom code (auto_map), which genome never runs "
                            "(trust_remote_code is off); use a model of an architecture vLLM supports natively")


def _validate_placement(cfg: RunConfig) -> None:
    """--devices / --eval_devices / --ray_address / --ray_actors on their own and together. The device count
    against the devices JAX sees, and a population that splits over them, are checked where JAX is loaded
    (scripts/run_loop.validate_more)."""
    if cfg.devices < -1:
        raise UserError(f"--devices must be >= 0 (0: unsharded) or 'all', got {cfg.devices}")
    if cfg.eval_devices is not None:
        if cfg.backend != "vllm":
            raise UserError("--eval_devices needs --backend vllm (it starts one vLLM worker per GPU)")
        if cfg.endpoints:
            raise UserError("--eval_devices cannot be combined with --endpoints (external servers place their own "
                            "engines)")
        if not _DEVICE_LIST.match(cfg.eval_devices):
            raise UserError(f"--eval_devices '{cfg.eval_devices}': expected a comma-separated list such as 0,1,2,3")
    if cfg.ray_address is not None:
        if cfg.backend != "vllm":
            raise UserError("--ray_address needs --backend vllm (it starts one vLLM engine per Ray actor)")
        if cfg.endpoints:
            raise UserError("--ray_address cannot be combined with --endpoints")
        if cfg.eval_devices is not None:
            raise UserError("--ray_address cannot be combined with --eval_devices (Ray gives each actor its own GPU)")
        if not _RAY_ADDRESS.match(cfg.ray_address):
            raise UserError(f"--ray_address '{cfg.ray_address}': expected local, auto or ray://host:port")
    if cfg.ray_actors is not None:
        if cfg.ray_address is None:
            raise UserError("--ray_actors needs --ray_address")
        if cfg.ray_actors < 1:
            raise UserError(f"--ray_actors must be at least 1, got {cfg.ray_actors}")


DATA_KEY = "data_sha256"  # run_config.json: {file: sha256} of the task and adapter files fitness reads


def file_digests(paths) -> dict[str, str]:
    """{absolute path: sha256 hex} of each file (a missing one maps to "missing")."""
    out = {}
    for p in paths:
        p = Path(p).absolute()
        try:
            out[str(p)] = sha256_file(p)
        except FileNotFoundError:
            out[str(p)] = "missing"
    return out


def data_differences(saved: Mapping[str, str], now: Mapping[str, str]) -> list[dict[str, str]]:
    """[{"file", "was", "now"}] for each file whose digest differs, appeared or disappeared (sorted by file)."""
    return [{"file": f, "was": saved.get(f, "absent"), "now": now.get(f, "absent")}
            for f in sorted(set(saved) | set(now)) if saved.get(f) != now.get(f)]


def save_run_config(cfg: RunConfig, path: str | os.PathLike, data: Mapping[str, str] | None = None) -> None:
    """Write the config as JSON atomically (temp name in the same folder, then rename); `data`: file digests of the
    data the run starts with (`file_digests`), stored under DATA_KEY."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    d = cfg.to_dict() if data is None else {**cfg.to_dict(), DATA_KEY: dict(data)}
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    from genome_jax import faults

    faults.point("run_config_temp_written")
    os.replace(tmp, path)


def run_config_from_dict(d: Mapping[str, Any], where: str) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (e.g. a saved run_config.json); unknown keys are an error
    (the data digests under DATA_KEY are not config keys: `saved_data_digests` reads them)."""
    return RunConfig(**_normalise_keys({k: v for k, v in d.items() if k != DATA_KEY}, where))


def saved_data_digests(d: Mapping[str, Any]) -> dict[str, str] | None:
    """The data digests of a saved run_config.json mapping (None: a run saved before they were recorded)."""
    data = d.get(DATA_KEY)
    return dict(data) if isinstance(data, dict) else None


def describe_mismatch(saved: RunConfig, wanted: RunConfig) -> str:
    """Which identity keys differ, as 'key: saved -> wanted' pieces (empty when resumable)."""
    a, b = saved.identity(), wanted.identity()
    diffs = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b.get(k)]
    return "; ".join(diffs)


def strategy_params(cfg: RunConfig):
    """(strategy, params) of the configured method (validated there; raises UserError on a bad combination)."""
    from genome_jax.strategies import make_strategy

    try:
        return _strategy_params(cfg, make_strategy)
    except UserError as e:  # speak in flags: "strategy setting 'cross' ..." -> "--cross_method ..."
        msg = str(e)
        for field, flag in _PARAM_FLAGS.items():
            msg = msg.replace(f"strategy setting '{field}'", f"--{flag}")
        raise UserError(msg) from None


_PARAM_FLAGS = {"combine": "combine_method", "cross": "cross_method",
                "population_size": "population_size",
                "max_population_size": "max_population_size", "cross_rate": "cross_rate",
                "individual_mutation_rate": "individual_mutation_rate", "gene_mutation_rate": "gene_mutation_rate",
                "sigma": "sigma", "elite_percent": "elite_percent"}


def _strategy_params(cfg: RunConfig, make_strategy):
    return make_strategy(
        cfg.method,
        population_size=cfg.population_size,
        max_population_size=cfg.max_population_size,
        combine=cfg.combine_method,
        cross=cfg.cross_method,
        cross_rate=cfg.cross_rate,
        individual_mutation_rate=cfg.individual_mutation_rate,
        gene_mutation_rate=cfg.gene_mutation_rate,
        sigma=cfg.sigma,
        elite_percent=cfg.elite_percent,
    )
