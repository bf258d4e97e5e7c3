"""PEFT folders on the evaluator side: ΔW against peft's own delta, fused-group pushes, rank refusal, content hash,
result cache. No vLLM engine here."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from evaluators.backends.cache import ResultCache
from evaluators.backends.peft_folder import adapter_info, check_rank, content_hash, delta_weights
from evaluators.backends.swap import BaseWeights, fused_group, plan_push
from evaluators.errors import UserError
from evaluators.protocol import ChoiceResponse, GenerateResponse


@pytest.mark.slow
def test_delta_weights_equal_peft_delta(tmp_path, make_peft_adapter, smollm2_fp32):
    """ΔW = s·B@A for every module, with rsLoRA, rank_pattern and alpha_pattern, equals peft's get_delta_weight."""
    from peft import PeftModel

    path = make_peft_adapter(tmp_path / "ad", rank=8, alpha=16, seed=3, use_rslora=True,
                             target_modules=("q_proj", "v_proj", "down_proj"),
                             rank_pattern={"model.layers.1.self_attn.q_proj": 4},
                             alpha_pattern={"v_proj": 5.0}, layers_to_transform=[0, 1, 2])
    ours = delta_weights(str(path))
    peft_model = PeftModel.from_pretrained(smollm2_fp32, str(path))
    try:
        ref = {}
        for name, mod in peft_model.named_modules():
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
                key = name.removeprefix("base_model.model.") + ".weight"
                ref[key] = mod.get_delta_weight("default").detach().float()
    finally:
        peft_model.unload()
    assert set(ours) == set(ref) and len(ref) == 9
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    # the patterns really were exercised: rank 4 in layer 1's q_proj, and a different scale for v_proj
    assert torch.linalg.matrix_rank(ours["model.layers.1.self_attn.q_proj.weight"]) == 4


def _tiny_base(tmp_path):
    names = [f"model.layers.0.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    sd = {n: torch.full((4, 3), float(i + 1), dtype=torch.bfloat16) for i, n in enumerate(names)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    return BaseWeights(str(tmp_path)), sd


def test_plan_push_sends_whole_fused_groups_and_restores(tmp_path):
    base, sd = _tiny_base(tmp_path)
    q, k, v = (f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkv")
    up, gate = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    assert fused_group(k) == [q, k, v] and fused_group(up) == [gate, up]
    d = torch.full((4, 3), 0.5)
    push, dirty = plan_push({q: d}, set(), base)
    got = dict(push)
    assert set(got) == {q, k, v} and dirty == {q}
    assert torch.equal(got[q], sd[q].float() + 0.5) and torch.equal(got[k], sd[k].float())
    assert got[q].dtype == torch.float32
    # next individual changes up_proj only: q's group goes back to base, gate rides along with up
    push, dirty = plan_push({up: d}, dirty, base)
    got = dict(push)
    assert set(got) == {q, k, v, gate, up} and dirty == {up}
    assert torch.equal(got[q], sd[q].float()) and torch.equal(got[up], sd[up].float() + 0.5)
    # the base model: only what is dirty (and its group) is restored
    push, dirty = plan_push({}, dirty, base)
    assert {n for n, _ in push} == {gate, up} and dirty == set()
    with pytest.raises(ValueError, match="shape"):
        plan_push({q: torch.zeros(2, 2)}, set(), base)


def test_plan_push_rounds_w_plus_delta_once_to_the_engine_dtype(tmp_path):
    """bf16 engine: the pushed weight is round_bf16(W + ΔW) summed in float32, not round(W) + round(ΔW): with
    W = 1 and ΔW = 2^-8 + 2^-17, the exact sum lies above the midpoint 1 + 2^-8 and rounds to 1 + 2^-7, while
    the rounded ΔW (2^-8) makes a tie that rounds to even: 1.0, the change lost."""
    base, sd = _tiny_base(tmp_path)
    q = "model.layers.0.self_attn.q_proj.weight"
    small = 2.0 ** -8 + 2.0 ** -17
    push, _ = plan_push({q: torch.full((4, 3), small)}, set(), base, out_dtype=torch.bfloat16)
    got = dict(push)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    want = (sd[q].float() + small).to(torch.bfloat16)  # one rounding of the exact float32 sum
    assert torch.equal(got[q], want) and float(got[q][0, 0]) == 1.0 + 2.0 ** -7
    assert float((sd[q] + torch.full((4, 3), small).to(torch.bfloat16))[0, 0]) != float(want[0, 0])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(got[k], sd[k])  # a sibling goes back as the exact base


def _write_adapter(path, r=8, **cfg_extra):
    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj"], **cfg_extra}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(r, 3),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, r)}
    save_file(sd, str(path / "adapter_model.safetensors"))
    return str(path)


def test_rank_above_max_is_refused_with_a_clear_message(tmp_path):
    ok = adapter_info(_write_adapter(tmp_path / "r16", r=16))
    check_rank(ok, 16)
    big = adapter_info(_write_adapter(tmp_path / "r32", r=32))
    with pytest.raises(UserError, match=r"r32: LoRA rank 32 is above max_lora_rank=16.*with max_lora_rank 32"):
        check_rank(big, 16)
    # a rank_pattern entry above the limit counts too
    pat = adapter_info(_write_adapter(tmp_path / "pat", r=8, rank_pattern={"q_proj": 64}))
    with pytest.raises(UserError, match="rank 64"):
        check_rank(pat, 16)


def test_malformed_adapter_folders_name_the_culprit(tmp_path):
    with pytest.raises(UserError, match="not found"):
        adapter_info(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        adapter_info(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{oops")
    with pytest.raises(UserError, match="bad/adapter_config.json: unreadable"):
        adapter_info(str(bad))
    with pytest.raises(UserError, match="DoRA"):
        adapter_info(_write_adapter(tmp_path / "dora", use_dora=True))


def test_content_hash_follows_bytes_not_paths(tmp_path):
    a = _write_adapter(tmp_path / "a")
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    assert content_hash(a) == content_hash(b)
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(8, 3),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.full((4, 8), 2.0)}
    save_file(sd, b + "/adapter_model.safetensors")
    assert content_hash(a) != content_hash(b)


def test_result_cache_memory_and_disk(tmp_path):
    resp = [ChoiceResponse((-1.0, -2.5)), GenerateResponse("42")]
    c = ResultCache(str(tmp_path / "cache"))
    assert c.get("k") is None
    c.put("k", resp)
    assert c.get("k") == resp
    fresh = ResultCache(str(tmp_path / "cache"))  # a resumed run reads what the last one wrote
    assert fresh.get("k") == resp and (fresh.hits, fresh.misses) == (1, 0)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.json"]  # no temp files left
