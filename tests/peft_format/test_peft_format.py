"""peft_format: PEFT's own rank/alpha/scale per module (read off a model PEFT built), and one content hash that
genome_jax and the evaluators both use."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key

import peft_format
from evaluators.backends.peft_folder import content_hash as evaluator_hash
from genome_jax.population import Population, PopulationMeta, adapter_hash, export_adapter

MODS = ("q_proj", "k_proj", "v_proj", "o_proj")


class _Tiny(torch.nn.Module):
    """Module names as in a Llama checkpoint: model.layers.{i}.self_attn.*_proj and model.layers.{i}.mlp.down_proj."""

    def __init__(self, layers=3):
        super().__init__()
        blocks = []
        for _ in range(layers):
            b = torch.nn.Module()
            b.self_attn = torch.nn.ModuleDict({m: torch.nn.Linear(4, 4, bias=False) for m in MODS})
            b.mlp = torch.nn.ModuleDict({"down_proj": torch.nn.Linear(4, 4, bias=False)})
            blocks.append(b)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(blocks)


# Patterns PEFT matches as a regex against a dotted suffix; the old evaluator rule missed "q_proj|v_proj". Among
# several matching keys the first wins; save_pretrained sorts the keys, so the cases list them sorted (otherwise
# PEFT's reloaded adapter would disagree with the model that wrote it).
CASES = [
    dict(r=8, lora_alpha=16, rank_pattern={"model.layers.1.self_attn.q_proj": 4, "down_proj": 2},
         alpha_pattern={"q_proj|v_proj": 5.0, r"layers\.0\..*o_proj": 3.0}),
    dict(r=4, lora_alpha=8, rank_pattern={"k_proj": 2, "layers.2.self_attn.k_proj": 6, "proj": 16},
         alpha_pattern={"self_attn.v_proj": 1.0}),
    dict(r=16, lora_alpha=32),
]


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_rank_and_scale_equal_peft_per_module(case, rslora, tmp_path):
    cfg = LoraConfig(target_modules=[*MODS, "down_proj"], use_rslora=rslora, **CASES[case])
    get_peft_model(_Tiny(), cfg).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / peft_format.CONFIG_NAME).read_text())
    model = PeftModel.from_pretrained(_Tiny(), str(tmp_path))  # PEFT reading the folder, as both our sides do
    seen = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "scaling") or "default" not in getattr(mod, "r", {}):
            continue
        path = name.removeprefix("base_model.model.")
        assert peft_format.module_rank_scale(saved, path) == (mod.r["default"], pytest.approx(mod.scaling["default"]))
        for pat in ("rank_pattern", "alpha_pattern"):
            keys = list(saved.get(pat) or {})
            want = get_pattern_key(keys, path)
            assert peft_format.pattern_key(saved.get(pat), path) == (want if want in keys else None)
        seen += 1
    assert seen == 15
    if case == 0:  # the patterns really select: rank 4 and 2, alpha 5 and 3 somewhere
        scales = {peft_format.module_rank_scale(saved, f"model.layers.{i}.{m}")
                  for i in range(3) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")}
        assert {r for r, _ in scales} == {8, 4, 2}


def test_defaults_are_loraconfigs():
    d = LoraConfig()
    assert (d.r, d.lora_alpha, d.use_rslora) == tuple(peft_format.PEFT_DEFAULTS.values())
    assert peft_format.module_rank_scale({}, "model.layers.0.self_attn.q_proj") == (8, 1.0)


def test_one_content_hash_on_both_sides(tmp_path):
    """genome_jax's adapter_hash and the evaluators' cache key are the same function of config + weight bytes."""
    rng = np.random.default_rng(0)
    f = {"model.layers.0.self_attn.q_proj": {"A": rng.standard_normal((2, 2, 6), np.float32),
                                              "B": rng.standard_normal((2, 4, 2), np.float32)}}
    pop = Population(factors=f, meta=PopulationMeta("base", ("q_proj",), 2, ("a", "b")))
    a = export_adapter(pop, 0, tmp_path / "a")
    b = export_adapter(pop, 1, tmp_path / "b")
    a2 = export_adapter(pop, 0, tmp_path / "a2")
    assert adapter_hash(a) == evaluator_hash(str(a)) == evaluator_hash(str(a2))
    assert adapter_hash(b) == evaluator_hash(str(b)) != adapter_hash(a)
    cfg = json.loads((a / peft_format.CONFIG_NAME).read_text())
    cfg["base_model_name_or_path"] = "other"
    (a2 / peft_format.CONFIG_NAME).write_text(json.dumps(cfg, indent=4))  # other formatting, other value
    assert adapter_hash(a2) == evaluator_hash(str(a2)) != adapter_hash(a)
