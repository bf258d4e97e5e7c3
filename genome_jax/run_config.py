"""The configuration of one `genome run`: a frozen dataclass, loaded from defaults < config file < flags.

The fields, their defaults, types, per-value checks and config-file keys all come from the settings table
(`genome_jax.settings.SETTINGS`); checks across settings are `validate` here. Keys are the setting names
(`population_size`, `task_weights`, ...), in YAML or TOML. Validation happens before any work: every problem is a
`UserError` whose one-line message names the setting (a `ParamError`; the CLI spells it as its flag).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import yaml

from genome_jax import faults
from genome_jax.errors import ParamError, UserError
from genome_jax.model_store import sha256_file
from genome_jax.sizes import n_elites
from genome_jax.settings import BY_NAME, KEYS, RESUME_MAY_CHANGE, SETTINGS, SYNTHETIC, Setting, check_value


class _RunConfigMethods:
    """What a RunConfig derives from its fields (the fields themselves come from the settings table)."""

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
        """The fields that decide the evolution's trajectory: a checkpoint is only resumed under the same identity.
        The others (settings.RESUME_MAY_CHANGE: placement, reporting, max_iter) may change on resume."""
        d = self.to_dict()
        for k in RESUME_MAY_CHANGE:
            d.pop(k)
        return d


_ANNOTATIONS = {"str": "str", "int": "int", "float": "float", "bool": "bool", "str_list": "tuple[str, ...]",
                "float_list": "tuple[float, ...]", "devices": "int", "device_list": "str"}


def _required(s: Setting) -> bool:
    return s.default is None and not s.optional


def _field(s: Setting) -> tuple:
    annotation = _ANNOTATIONS[s.kind] + (" | None" if s.optional else "")
    if _required(s):
        return s.name, annotation
    return s.name, annotation, dataclasses.field(default=s.default)


assert [s.name for s in SETTINGS if _required(s)] == ["tasks"] and SETTINGS[0].name == "tasks"
RunConfig = dataclasses.make_dataclass(
    "RunConfig", [_field(s) for s in SETTINGS], bases=(_RunConfigMethods,), frozen=True,
    namespace={"__module__": __name__,
               "__doc__": "Everything that defines a run: one field per setting of genome_jax.settings.SETTINGS "
                          "(defaults follow the GENOME reference scripts)."})


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check one value's type against its setting's kind; lists become tuples. Raises UserError naming key and
    source (the key as written there)."""
    s = BY_NAME[KEYS[key]]
    kind = s.kind
    if value is None:
        if s.optional:
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
        raise UserError(f"config file {path}: no such file")
    text = p.read_text()
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"config file {path}: unknown format '{suffix}' (use .yaml, .yml or .toml)")
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except Exception as e:  # the parsers' own messages carry line and column
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"config file {path}: cannot parse: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of keys to values at the top level")
    return data


def _normalise_keys(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """{key as written: value} -> {setting name: typed value}; aliases and a bool's switch (`no_init_merge: true`)
    are resolved. Raises UserError naming the key."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k not in KEYS:
            close = [c for c in BY_NAME if c.startswith(k[:4])] if len(k) >= 4 else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}: unknown key '{key}'{hint}")
        s = BY_NAME[KEYS[k]]
        if s.name in out:
            raise UserError(f"{where}: key '{key}' given twice")
        value = _coerce(k, value, where)
        if s.kind == "bool" and k != s.name:  # the switch: `no_init_merge: true` flips the default
            value = (not value) if s.default else value
        out[s.name] = value
    return out


def load_run_config(
    flags: Mapping[str, Any],
    config_file: str | os.PathLike | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """defaults < base < config file < flags. `flags`: {setting name (or alias): value} of the settings the user
    gave (None means not given); `base` is a saved config (resume: `run_config.json` of the run folder).

    Task names are the caller's to check (genome_jax never imports evaluators). Returns a validated RunConfig or
    raises UserError (ParamError for a bad value).
    """
    values: dict[str, Any] = {}
    if base is not None:
        values.update(_normalise_keys(base, "saved run config"))
    if config_file is not None:
        values.update(_normalise_keys(read_config_file(config_file), f"config file {config_file}"))
    given = {k: v for k, v in flags.items() if v is not None}
    values.update(_normalise_keys(given, "settings"))
    if "tasks" not in values:
        raise ParamError("{tasks} is required: task names (e.g. mmlu gsm8k arc_c), task files, or synthetic")
    cfg = RunConfig(**values)
    validate(cfg)
    return cfg


def devices_label(n: int) -> str:
    return "all" if n == -1 else str(n)


_RAY_ADDRESS = re.compile(r"^(local|auto|ray://[^\s/:]+(:\d+)?|[^\s/:]+:\d+)$")
_DEVICE_LIST = re.compile(r"^\s*[^,\s]+\s*(,\s*[^,\s]+\s*)*$")


def validate(cfg: RunConfig) -> None:
    """Raise ParamError (one line, naming the setting) for any invalid value or combination; touches no file
    except reading the model folder's config.json."""
    for s in SETTINGS:
        if s.kind != "devices":
            check_value(s, getattr(cfg, s.name))
    _validate_tasks(cfg)
    if cfg.max_population_size is not None:
        if cfg.method != "genome_plus":
            raise ParamError("{max_population_size} only applies to {method} genome_plus")
        if cfg.max_population_size < cfg.population_size:
            raise ParamError("{max_population_size} ({a}) must be >= {population_size} ({b})",
                             a=cfg.max_population_size, b=cfg.population_size)
    if cfg.n_offspring is not None and cfg.method != "genome_plus":
        raise ParamError("{n_offspring} only applies to {method} genome_plus")
    if n_elites(cfg.population_size, cfg.elite_percent) >= cfg.population_size:  # the strategies' elite count
        raise ParamError("{elite_percent} {e} keeps every one of the {n} individuals ({population_size}) as an "
                         "elite; nothing would be bred", e=cfg.elite_percent, n=cfg.population_size)
    if cfg.endpoints and cfg.backend != "vllm":
        raise ParamError("{endpoints} needs {backend} vllm")
    for url in cfg.endpoints:
        if not re.match(r"^https?://[^\s/]+", url):
            raise ParamError("{endpoints}: {url!r} is not an http(s):// URL", url=url)
    _validate_placement(cfg)
    _validate_folders(cfg)


def _validate_tasks(cfg: RunConfig) -> None:
    if not cfg.tasks:
        raise ParamError("{tasks} needs at least one task")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ParamError("{tasks} lists a task twice: {t}", t=" ".join(cfg.tasks))
    if SYNTHETIC in cfg.tasks and len(cfg.tasks) > 1:
        raise ParamError("{tasks} synthetic is a test problem and cannot be mixed with real tasks")
    if cfg.synthetic and cfg.test_tasks:
        raise ParamError("{test_tasks} cannot be used with {tasks} synthetic (the test problem has no test split)")
    if SYNTHETIC in cfg.test_tasks:
        raise ParamError("{test_tasks} cannot include 'synthetic'")
    if cfg.task_weights is not None:
        if len(cfg.task_weights) != len(cfg.tasks):
            raise ParamError("{task_weights} has {a} value(s) but {tasks} has {b}: give one weight per task",
                             a=len(cfg.task_weights), b=len(cfg.tasks))
        if any(not math.isfinite(w) or w < 0 for w in cfg.task_weights):
            raise ParamError("{task_weights} must be finite and >= 0, got {w}", w=" ".join(map(str, cfg.task_weights)))
        if sum(cfg.task_weights) <= 0:
            raise ParamError("{task_weights} must not all be 0")


def _validate_placement(cfg: RunConfig) -> None:
    """devices / eval_devices / ray_address / ray_actors on their own and together. The device count against the
    devices JAX sees, and a population that splits over them, are checked where JAX devices are listed (the run)."""
    if cfg.devices < -1:
        raise ParamError("{devices} must be >= 0 (0: unsharded) or 'all', got {n}", n=cfg.devices)
    if cfg.eval_devices is not None:
        if cfg.backend != "vllm":
            raise ParamError("{eval_devices} needs {backend} vllm (it starts one vLLM worker per GPU)")
        if cfg.endpoints:
            raise ParamError("{eval_devices} cannot be combined with {endpoints} (external servers place their own "
                             "engines)")
        if not _DEVICE_LIST.match(cfg.eval_devices):
            raise ParamError("{eval_devices} {v!r}: expected a comma-separated list such as 0,1,2,3",
                             v=cfg.eval_devices)
    if cfg.ray_address is not None:
        if cfg.backend != "vllm":
            raise ParamError("{ray_address} needs {backend} vllm (it starts one vLLM engine per Ray actor)")
        if cfg.endpoints:
            raise ParamError("{ray_address} cannot be combined with {endpoints}")
        if cfg.eval_devices is not None:
            raise ParamError("{ray_address} cannot be combined with {eval_devices} (Ray gives each actor its own GPU)")
        if not _RAY_ADDRESS.match(cfg.ray_address):
            raise ParamError("{ray_address} {v!r}: expected local, auto or ray://host:port", v=cfg.ray_address)
    if cfg.ray_actors is not None and cfg.ray_address is None:
        raise ParamError("{ray_actors} needs {ray_address}")


def _validate_folders(cfg: RunConfig) -> None:
    if not cfg.synthetic and cfg.lora_dir is None:
        raise ParamError("{lora_dir} is required: a folder of PEFT LoRA expert folders")
    if cfg.lora_dir is not None and not Path(cfg.lora_dir).is_dir():
        raise ParamError("{lora_dir} {p}: no such folder", p=cfg.lora_dir)
    if cfg.model_path is None or cfg.synthetic:
        return
    if not Path(cfg.model_path).is_dir():
        raise ParamError("{model_path} {p}: no such folder", p=cfg.model_path)
    model_config = Path(cfg.model_path) / "config.json"
    if not model_config.is_file():
        raise ParamError("{model_path} {p}: no config.json there (not a Hugging Face model folder)", p=cfg.model_path)
    try:
        auto_map = json.loads(model_config.read_text()).get("auto_map")
    except (ValueError, AttributeError, OSError):
        raise UserError(f"{model_config}: not a readable JSON object") from None
    if auto_map:  # custom modelling code is never run (trust_remote_code stays off)
        raise UserError(f"{model_config}: the model needs custom code (auto_map), which genome never runs "
                        "(trust_remote_code is off); use a model of an architecture vLLM supports natively")


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
