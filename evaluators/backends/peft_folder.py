"""Reading PEFT LoRA folders on the evaluator side: config checks (no torch), content hash, and ΔW per weight (torch).

The config checks and the hash run in the engine's process (they need only json + hashlib); `delta_weights` runs in
the worker, which has torch. The scale rule and the hash are peft_format's, shared with genome_jax. Weight names
follow the HF checkpoint: PEFT key
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> `model.layers.0.self_attn.q_proj.weight`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import peft_format
from evaluators.errors import UserError

CONFIG = peft_format.CONFIG_NAME
WEIGHT_FILES = (peft_format.WEIGHTS_NAME, peft_format.PICKLE_NAME)
# Linear layers whose LoRA both the weight-swap path and vLLM's LoRA path apply (Llama-family names).
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int  # the largest rank over modules (rank_pattern included)
    target_modules: tuple[str, ...]
    base_model: str | None


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isdir(path):
        raise UserError(f"adapter folder not found: {path}")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path}: not a PEFT adapter folder (no {CONFIG})")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path}: unreadable adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: adapter config is not a JSON object")
    return cfg


def adapter_info(path: str) -> AdapterInfo:
    """Validate what both scoring paths need from a PEFT folder (clear one-line errors naming the folder)."""
    cfg = read_config(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA only)")
    if cfg.get("use_dora"):
        raise UserError(f"{path}: DoRA adapters are not supported (use_dora=true)")
    if cfg.get("modules_to_save"):
        raise UserError(f"{path}: modules_to_save={cfg['modules_to_save']} is not supported (LoRA factors only)")
    try:
        r = int(cfg["r"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}/{CONFIG}: missing or invalid 'r'") from None
    ranks = [r] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # PEFT allows a regex; the actual modules are then read from the weights
        targets = [targets]
    if not os.path.isfile(os.path.join(path, WEIGHT_FILES[0])):
        if os.path.exists(os.path.join(path, WEIGHT_FILES[1])):  # never unpickled, not even with weights_only
            raise UserError(f"{path}/{WEIGHT_FILES[1]}: pickle weights refused (adapters are never unpickled); "
                            "convert it to adapter_model.safetensors in a trusted environment")
        raise UserError(f"{path}: no adapter_model.safetensors")
    return AdapterInfo(path, max(ranks), tuple(sorted(targets)), cfg.get("base_model_name_or_path"))


def check_rank(info: AdapterInfo, max_lora_rank: int) -> None:
    if info.rank > max_lora_rank:
        raise UserError(
            f"{info.path}: LoRA rank {info.rank} is above max_lora_rank={max_lora_rank}; "
            f"restart the evaluator with max_lora_rank {_next_pow2(info.rank)} (or higher)"
        )


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def content_hash(path: str) -> str:
    """The cache identity of an individual: peft_format.content_hash of its config and safetensors weights."""
    cfg = read_config(path)
    try:
        return peft_format.content_hash(cfg, os.path.join(path, WEIGHT_FILES[0]))
    except OSError as e:
        raise UserError(f"{path}/{WEIGHT_FILES[0]}: unreadable ({e.strerror or e})") from None


def delta_weights(path: str):
    """ΔW = s * B @ A per targeted weight, in float32. Returns {hf_weight_name: (d_out, d_in) torch tensor}."""
    import torch  # heavy, worker only: the engine process checks and hashes folders without torch
    from safetensors.torch import load_file

    cfg = read_config(path)
    sd = load_file(os.path.join(path, WEIGHT_FILES[0]))  # safetensors only: adapters are never unpickled
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in sd.items():
        m = _KEY.match(key)
        if m is None:
            raise UserError(f"{path}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        factors.setdefault(m["module"], {})[m["ab"]] = val
    out = {}
    for module, ab in sorted(factors.items()):
        short = module.rsplit(".", 1)[-1]
        if short not in SUPPORTED_MODULES:
            raise UserError(f"{path}: LoRA on {module!r} is not supported (supported: {', '.join(SUPPORTED_MODULES)})")
        if set(ab) != {"A", "B"}:
            raise UserError(f"{path}: module {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"].to(torch.float32), ab["B"].to(torch.float32)  # A: (r, d_in), B: (d_out, r)
        if a.shape[0] != b.shape[1]:
            raise UserError(f"{path}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} (ranks differ)")
        r, scale = peft_format.module_rank_scale(cfg, module)
        if a.shape[0] != r:
            raise UserError(f"{path}: {module!r} has rank {a.shape[0]} but {CONFIG} gives r={r} for it")
        out[module + ".weight"] = (b @ a) * scale
    if not out:
        raise UserError(f"{path}: the adapter holds no LoRA weights")
    return out
