"""A population of LoRA adapters as one stacked pytree (Contract 1 in ARCHITECTURE.md), and PEFT folder I/O.

    factors = {module_path: {"A": (P, r, d_in), "B": (P, d_out, r)}}     ΔW_i = B[i] @ A[i]   (scale folded into B)

`module_path` is the PEFT key without `base_model.model.` and `.lora_A.weight`, e.g. `model.layers.0.self_attn.q_proj`
(the same name PEFT matches `rank_pattern` / `alpha_pattern` against). Lower ranks are zero-padded up to the common r.

Reading never unpickles: only `adapter_model.safetensors` is accepted. Writing is atomic: a temp folder beside the
target is renamed into place, so a reader sees either the old adapter or the new one, never half of one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy  # called through the module: tests inject a full disk there

import peft_format
from genome_jax import faults
from genome_jax.errors import UserError
from peft_format import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME

_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
# Files a folder we may overwrite can hold (what PEFT's save_pretrained and export_adapter write).
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md", "genome.json"}


@dataclasses.dataclass(frozen=True)
class PopulationMeta:
    base_model: str                  # base_model_name_or_path shared by all adapters
    target_modules: tuple[str, ...]  # sorted short names, e.g. ("q_proj", "v_proj")
    rank: int                        # common (padded) rank r
    names: tuple[str, ...]           # one per individual


@flax.struct.dataclass
class Population:
    factors: dict[str, dict[str, jax.Array]]   # {module_path: {"A": (P, r, d_in), "B": (P, d_out, r)}}
    meta: PopulationMeta = flax.struct.field(pytree_node=False)

    @property
    def size(self) -> int:
        """P, the number of individuals."""
        return len(self.meta.names)


# ------------------------------------------------------------------------------------------------------------ load
@dataclasses.dataclass(frozen=True)
class _Adapter:
    """One PEFT folder, read and checked on the host (numpy, scale already folded into B)."""

    folder: Path
    base_model: str
    modules: dict[str, tuple[np.ndarray, np.ndarray]]  # module_path -> (A (r_m, d_in), B (d_out, r_m) * scale)


def load_population(lora_dir_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
                    dtype=jnp.float32) -> Population:
    """Read PEFT LoRA folders into one stacked Population on the default device.

    `lora_dir_or_paths`: a folder whose subfolders (sorted by name) are PEFT adapters, a single adapter folder,
    or an explicit list of adapter folders. Every ΔW_i = scale_i * B_i @ A_i is preserved: the scale is folded into
    B (in float64, then cast to `dtype`) and lower ranks are zero-padded to the largest one.
    """
    folders = adapter_folders(lora_dir_or_paths)
    adapters = [_read_adapter(f) for f in folders]
    first = adapters[0]
    for ad in adapters[1:]:
        if ad.base_model != first.base_model:
            raise UserError(f"{ad.folder / CONFIG_NAME}: base_model_name_or_path {ad.base_model!r} differs from "
                            f"{first.base_model!r} in {first.folder / CONFIG_NAME}")
        if ad.modules.keys() != first.modules.keys():
            extra = sorted(ad.modules.keys() - first.modules.keys())
            missing = sorted(first.modules.keys() - ad.modules.keys())
            what = f"has extra module {extra[0]}" if extra else f"lacks module {missing[0]}"
            raise UserError(f"{ad.folder / WEIGHTS_NAME}: different target modules: {what} "
                            f"(compared with {first.folder.name}); all adapters must adapt the same modules")
        for path, (a, b) in ad.modules.items():
            a0, b0 = first.modules[path]
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise UserError(f"{ad.folder / WEIGHTS_NAME}: {path} has d_in x d_out = {a.shape[1]} x {b.shape[0]}"
                                f" but {first.folder.name} has {a0.shape[1]} x {b0.shape[0]}")
    rank = max(a.shape[0] for ad in adapters for a, _ in ad.modules.values())
    factors = {}
    for path in sorted(first.modules):
        As, Bs = [], []
        for ad in adapters:
            a, b = ad.modules[path]
            As.append(np.pad(a, ((0, rank - a.shape[0]), (0, 0))))
            Bs.append(np.pad(b, ((0, 0), (0, rank - b.shape[1]))))
        factors[path] = {"A": jnp.asarray(np.stack(As), dtype=dtype), "B": jnp.asarray(np.stack(Bs), dtype=dtype)}
    meta = PopulationMeta(
        base_model=first.base_model,
        target_modules=tuple(sorted({p.rsplit(".", 1)[-1] for p in first.modules})),
        rank=rank,
        names=_unique_names([f.name for f in folders]),
    )
    return Population(factors=factors, meta=meta)


def adapter_folders(lora_dir_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The adapter folders `load_population` would read, in order (checks they exist; reads no weights)."""
    if isinstance(lora_dir_or_paths, (str, os.PathLike)):
        root = Path(lora_dir_or_paths)
        if not root.is_dir():
            raise UserError(f"{root}: no such directory" if not root.exists() else f"{root}: not a directory")
        if (root / CONFIG_NAME).exists() or (root / WEIGHTS_NAME).exists() or (root / PICKLE_NAME).exists():
            return [root]  # a single adapter folder is a population of one
        real_root = root.resolve()
        folders = []
        for sub in sorted(root.iterdir(), key=lambda p: p.name):
            if not sub.is_dir():
                continue
            if not any((sub / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)):
                continue  # not an adapter (logs/, plots/ ...)
            if sub.is_symlink() and not sub.resolve().is_relative_to(real_root):
                raise UserError(f"{sub}: symlinked adapter folder points outside {root} (to {sub.resolve()})")
            folders.append(sub)
        if not folders:
            raise UserError(f"{root}: no PEFT adapter folders found (expected subfolders holding "
                            f"{CONFIG_NAME} + {WEIGHTS_NAME})")
        return folders
    folders = [Path(p) for p in lora_dir_or_paths]
    if not folders:
        raise UserError("no adapter folders given (empty list)")
    for f in folders:
        if not f.is_dir():
            raise UserError(f"{f}: no such adapter folder" if not f.exists() else f"{f}: not a directory")
    return folders


def _unique_names(names: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}-{k}")
    return tuple(out)


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """Parse and check `folder/adapter_config.json` (LoRA only, features we can represent as ΔW = B @ A)."""
    path = Path(folder) / CONFIG_NAME
    if not path.exists():
        raise UserError(f"{path}: missing (not a PEFT adapter folder?)")
    if not path.is_file():
        raise UserError(f"{path}: unreadable: not a regular file")
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: unreadable: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: invalid: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{path}: invalid {key}: {v!r} (expected a positive number)")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in pattern.values()):
            raise UserError(f"{path}: invalid {key}: expected an object mapping module patterns to positive numbers")
    unsupported = {
        "use_dora": "DoRA (magnitude vectors are not a B @ A product)",
        "lora_bias": "LoRA bias terms",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layout)",
        "modules_to_save": "modules_to_save (full-weight copies)",
        "target_parameters": "target_parameters",
        "trainable_token_indices": "trainable_token_indices",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise UserError(f"{path}: {key} is set; {what} is not supported, only plain LoRA")
    if cfg.get("bias", "none") not in ("none", None):
        raise UserError(f"{path}: bias={cfg.get('bias')!r} is not supported (only 'none')")
    return cfg


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return st_numpy.load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: unreadable safetensors file: {e}") from None


def _read_adapter(folder: Path) -> _Adapter:
    cfg = read_adapter_config(folder)
    wpath = folder / WEIGHTS_NAME
    if not wpath.is_file():
        if (folder / PICKLE_NAME).exists():
            raise UserError(
                f"{folder / PICKLE_NAME}: pickle weights refused (we never unpickle). Convert once, in a trusted "
                f"environment: python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"")
        raise UserError(f"{wpath}: missing")
    tensors = _load_safetensors(wpath)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if not m:
            raise UserError(f"{wpath}: unexpected tensor {key!r} (only {_PREFIX}<module>.lora_A/B.weight allowed)")
        parts.setdefault(m["path"], {})[m["ab"]] = t
    if not parts:
        raise UserError(f"{wpath}: holds no LoRA tensors")
    targets = cfg.get("target_modules")
    modules = {}
    for path in sorted(parts):
        ab = parts[path]
        if set(ab) != {"A", "B"}:
            raise UserError(f"{wpath}: {path} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        r, scale = peft_format.module_rank_scale(cfg, path)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise UserError(f"{wpath}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                            f"which disagrees with r={r} in {CONFIG_NAME}")
        if isinstance(targets, list) and not any(path == t or path.endswith("." + t) for t in targets):
            raise UserError(f"{wpath}: {path} is not among target_modules {targets} of {CONFIG_NAME}")
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        for name, x in (("lora_A", a64), ("lora_B", b64)):
            if not np.isfinite(x).all():
                bad = "NaN" if np.isnan(x).any() else "Inf"
                raise UserError(f"{wpath}: {path}.{name} contains {bad} values")
        modules[path] = (a64, b64 * scale)
    return _Adapter(folder=folder, base_model=str(cfg.get("base_model_name_or_path") or ""), modules=modules)


# ---------------------------------------------------------------------------------------------------------- checks
def validate_population(population: Population) -> Population:
    """Check shapes and finiteness at a boundary (host-side, not jittable); returns `population` unchanged."""
    meta, P, r = population.meta, population.size, population.meta.rank
    if not population.factors:
        raise UserError("population has no modules")
    for path in sorted(population.factors):
        leaf = population.factors[path]
        if set(leaf) != {"A", "B"}:
            raise UserError(f"population module {path}: expected keys A and B, got {sorted(leaf)}")
        a, b = leaf["A"], leaf["B"]
        if a.ndim != 3 or b.ndim != 3:
            raise UserError(f"population module {path}: A {a.shape} / B {b.shape} must be 3-D (P, r, d)")
        if a.shape[:2] != (P, r) or b.shape[0] != P or b.shape[2] != r:
            raise UserError(f"population module {path}: A {a.shape} / B {b.shape} disagree with P={P}, r={r}")
        if path.rsplit(".", 1)[-1] not in meta.target_modules:
            raise UserError(f"population module {path} is not among target_modules {meta.target_modules}")
        for name, x in (("A", a), ("B", b)):
            finite = np.asarray(jnp.isfinite(x).all(axis=tuple(range(1, x.ndim))))
            if not finite.all():
                i = int(np.argmin(finite))
                raise UserError(f"population module {path}.{name}: individual {i} ({meta.names[i]}) has NaN/Inf")
    return population


def delta_weight(population: Population, i: int, module_path: str) -> jax.Array:
    """ΔW of individual i at one module: (d_out, d_in) = B[i] @ A[i]."""
    leaf = population.factors[module_path]
    return leaf["B"][i] @ leaf["A"][i]


def effective_ranks(population: Population) -> list[int]:
    """Per individual: the smallest rank that holds all its non-zero components (trailing zero padding dropped)."""
    P, r = population.size, population.meta.rank
    used = np.zeros((P, r), dtype=bool)
    for leaf in population.factors.values():
        a = np.asarray(jnp.any(leaf["A"] != 0, axis=2))   # (P, r)
        b = np.asarray(jnp.any(leaf["B"] != 0, axis=1))   # (P, r)
        used |= a & b
    idx = np.arange(1, r + 1)
    return [int(max(1, (idx * used[i]).max())) for i in range(P)]


def _effective_rank(factors, rank: int) -> int:
    """One individual's `effective_ranks` entry from its host factors: iterable of (A (r, d_in), B (d_out, r))."""
    used = np.zeros((rank,), dtype=bool)
    for a, b in factors:
        used |= a.any(axis=1) & b.any(axis=0)
    return int(max(1, (np.arange(1, rank + 1) * used).max()))


def population_summary(population: Population) -> dict:
    """Plain-data summary for `genome inspect`: P, ranks, target modules, parameter count, bytes."""
    meta = population.meta
    leaves = jax.tree_util.tree_leaves(population.factors)
    dims = {p: (int(v["A"].shape[2]), int(v["B"].shape[1])) for p, v in population.factors.items()}
    return {
        "P": population.size,
        "names": list(meta.names),
        "base_model": meta.base_model,
        "rank": meta.rank,
        "ranks": effective_ranks(population),
        "target_modules": list(meta.target_modules),
        "modules": len(population.factors),
        "params_per_individual": sum(meta.rank * (d_in + d_out) for d_in, d_out in dims.values()),
        "params": sum(int(x.size) for x in leaves),
        "bytes": sum(int(x.size) * x.dtype.itemsize for x in leaves),
        "dtype": str(leaves[0].dtype),
    }


# ---------------------------------------------------------------------------------------------------------- export
def export_adapter(population: Population, i: int, out_dir: str | os.PathLike, *, trim: bool = True,
                   dtype=None) -> Path:
    """Write individual i as a PEFT LoRA folder at `out_dir` (atomically) and return its path.

    The config is honest: r = the (trimmed) rank, lora_alpha = r so PEFT's scale is 1 and ΔW = B @ A as stored.
    `trim` drops trailing rank components that are zero in every module (padding). `dtype` (e.g. jnp.bfloat16)
    converts the stored tensors; default keeps the population's dtype. An existing adapter folder at `out_dir`
    is replaced; any other non-empty folder is refused.
    """
    P = population.size
    if not -P <= i < P:
        raise UserError(f"individual index {i} out of range for a population of {P}")
    i %= P
    meta = population.meta
    # Only individual i is read (one slice per tensor), and its rank is found on those host copies: the cost of an
    # export is independent of P (it used to compute every individual's rank per child: quadratic in P).
    host = {path: (np.asarray(leaf["A"][i]), np.asarray(leaf["B"][i])) for path, leaf in population.factors.items()}
    r = _effective_rank(host.values(), meta.rank) if trim else meta.rank
    tensors = {}
    for path in sorted(host):
        a, b = host[path][0][:r], host[path][1][:, :r]
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)  # numpy knows bfloat16 (ml_dtypes)
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_model,
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "target_modules": list(meta.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    return _write_folder_atomic(Path(out_dir), config, tensors)


def export_population(population: Population, out_root: str | os.PathLike, names: Sequence[str] | None = None,
                      **kwargs) -> list[Path]:
    """Export every individual to `out_root/<name>` (names default to population.meta.names)."""
    names = list(population.meta.names if names is None else names)
    if len(names) != population.size:
        raise UserError(f"{len(names)} names given for a population of {population.size}")
    if len(set(names)) != len(names):
        raise UserError(f"export names must be unique, got {names}")
    for n in names:
        if not n or n in (".", "..") or "/" in n or n.startswith("."):
            raise UserError(f"invalid adapter folder name {n!r}")
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    return [export_adapter(population, i, root / n, **kwargs) for i, n in enumerate(names)]


def _write_folder_atomic(out: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder; refusing to overwrite it")
        stray = sorted(p.name for p in out.iterdir() if p.name not in _ADAPTER_FILES)
        if stray or (any(out.iterdir()) and not (out / CONFIG_NAME).exists()):
            raise UserError(f"{out}: exists and is not an adapter folder (holds {stray[:3] or 'no config'}); "
                            f"refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out}: cannot write the adapter ({e.strerror or e})") from None
    try:
        try:
            st_numpy.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        except (OSError, SafetensorError) as e:  # disk full, quota, file size limit: one clear line, no half folder
            raise UserError(f"{out}: cannot write the adapter ({getattr(e, 'strerror', None) or e})") from None
        os.chmod(tmp, 0o755)
        faults.point("adapter_temp_written")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.replace(out, old)
            faults.point("adapter_old_moved")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def adapter_hash(folder: str | os.PathLike) -> str:
    """Content hash of a PEFT folder (peft_format.content_hash: the evaluators' cache key too), after checking its
    config. Same weights + config -> same hash, in any folder."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    try:
        return peft_format.content_hash(cfg, folder / WEIGHTS_NAME)
    except OSError as e:
        raise UserError(f"{folder / WEIGHTS_NAME}: unreadable: {e.strerror or e}") from None
