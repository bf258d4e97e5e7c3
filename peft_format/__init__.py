"""The PEFT LoRA folder format, as both sides of the JAX/vLLM wall read it: file names, PEFT's scale rule and the one
content hash of an adapter. Pure Python (json, hashlib, re, math): no JAX, no torch, and nothing of ours, so that
`genome_jax` (population I/O) and `evaluators` (the cache key, ΔW in the worker) import the same rules.

    module_rank_scale(config, "model.layers.0.self_attn.q_proj") -> (r, scale)    ΔW = scale * B @ A
    content_hash(config, "DIR/adapter_model.safetensors") -> sha256 hex         same config + bytes -> same hash
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Mapping

__all__ = ["CONFIG_NAME", "PEFT_DEFAULTS", "PICKLE_NAME", "WEIGHTS_NAME", "content_hash", "module_rank_scale",
           "pattern_key"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # refused by both readers: adapters are never unpickled
# LoraConfig's defaults for a config that omits them (peft.tuners.lora.config.LoraConfig)
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False}
_HASH_VERSION = b"genome-adapter-v1\n"


def pattern_key(patterns: Mapping[str, object] | None, module_path: str) -> str | None:
    """The first key of `patterns` (rank_pattern / alpha_pattern) that PEFT applies to `module_path`, else None.

    PEFT's rule (peft.utils.other.get_pattern_key): the key, read as a regex, must match a dotted suffix of the
    path: re.match(rf"(.*\\.)?({key})$", path). So "v_proj", "layers.1.self_attn.q_proj", "q_proj|v_proj" and
    r"layers\\.0\\..*o_proj" all select modules; "proj" does not select q_proj."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def module_rank_scale(config: Mapping, module_path: str) -> tuple[int, float]:
    """(r, scale) PEFT uses for `module_path` (the model's module name, e.g. model.layers.0.self_attn.q_proj):
    r and lora_alpha from rank_pattern / alpha_pattern when a key matches (`pattern_key`), else the config's r /
    lora_alpha; scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rk, ak = pattern_key(rank_pattern, module_path), pattern_key(alpha_pattern, module_path)
    r = rank_pattern[rk] if rk is not None else config.get("r", PEFT_DEFAULTS["r"])
    alpha = alpha_pattern[ak] if ak is not None else config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora", PEFT_DEFAULTS["use_rslora"]) else alpha / r
    return int(r), float(scale)


def content_hash(config: Mapping, weights_path: str | os.PathLike) -> str:
    """The content hash of an adapter (result-cache identity, dedupe): sha256 over a version tag, the canonical JSON
    of its parsed adapter_config.json (sorted keys, no whitespace) and the bytes of its weights file. The same config
    and weights in any folder give the same hash. Raises OSError when the weights file cannot be read."""
    h = hashlib.sha256(_HASH_VERSION)
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    with open(weights_path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
