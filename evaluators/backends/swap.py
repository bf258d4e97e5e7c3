"""Weight swap: turn an individual's LoRA into full weights W + ΔW for a live vLLM engine (worker side, torch).

vLLM fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`; its in-place reload rebuilds a fused layer
only once every shard of it has arrived, so a push that carries q alone corrupts k and v. `plan_push` therefore
always sends whole fused groups: the modified shards as W + ΔW, their siblings as the cached base W. Weights an
earlier individual modified and this one does not are sent back as base W (the engine then holds exactly W + ΔW_i).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

# sibling shards that vLLM loads into one fused parameter (Llama family)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP_OF = {m: g for g in FUSED_GROUPS for m in g}


def fused_group(weight_name: str) -> list[str]:
    """`model.layers.3.self_attn.k_proj.weight` -> the q, k, v names of layer 3 (a lone module -> itself)."""
    module, _, tail = weight_name.rpartition(".")  # tail == "weight"
    prefix, _, short = module.rpartition(".")
    return [f"{prefix}.{m}.{tail}" for m in _GROUP_OF.get(short, (short,))]


class BaseWeights:
    """Lazily read base weights from the model's safetensors, kept as float32 (exact for a bf16 checkpoint)."""

    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32):
        self._dtype = dtype
        self._cache: dict[str, torch.Tensor] = {}
        self._where: dict[str, str] = {}
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = {os.path.join(model_dir, v) for v in json.load(f)["weight_map"].values()}
        else:
            files = {os.path.join(model_dir, "model.safetensors")}
        self._handles = {f: safe_open(f, framework="pt") for f in sorted(files)}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[k] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            t = self._handles[self._where[name]].get_tensor(name).to(self._dtype).contiguous()
            self._cache[name] = t
        return t


def plan_push(
    deltas: dict[str, torch.Tensor], dirty: set[str], base: BaseWeights, out_dtype: torch.dtype | None = None
) -> tuple[list[tuple[str, torch.Tensor]], set[str]]:
    """Weights to push so that the engine holds W + ΔW for this individual and base W everywhere else.

    deltas: {hf_weight_name: ΔW (d_out, d_in)}; dirty: names currently holding a non-base value in the engine.
    W + ΔW is summed in the base's dtype (float32) and rounded once to `out_dtype` (the engine's; None: as summed),
    so a bf16 engine gets round(W + ΔW), never round(W) + round(ΔW).
    Returns (name, tensor) pairs covering every touched fused group, and the new dirty set (= deltas' names).
    """
    for name, d in deltas.items():
        if name not in base:
            raise KeyError(f"adapter weight {name!r} is not a weight of the base model")
        if tuple(d.shape) != tuple(base[name].shape):
            raise ValueError(f"adapter ΔW for {name!r} has shape {tuple(d.shape)}, base has {tuple(base[name].shape)}")
    names = set()
    for n in set(deltas) | dirty:
        names.update(fused_group(n))
    push = []
    for n in sorted(names):
        w = base[n]
        t = w + deltas[n].to(w.dtype) if n in deltas else w
        push.append((n, t if out_dtype is None else t.to(out_dtype)))
    return push, set(deltas)
