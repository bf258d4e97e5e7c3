"""Population I/O: PEFT folders <-> stacked pytree. References: numpy ΔW from the raw safetensors + PEFT's own
scaling rules written out here, peft's get_delta_weight, and transformers + peft logits on the real SmolLM2."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from genome_jax.errors import UserError
from genome_jax.population import (Population, PopulationMeta, adapter_hash, delta_weight, effective_ranks,
                                   export_adapter, export_population, load_population, population_summary,
                                   validate_population)

TARGETS = ("q_proj", "k_proj", "down_proj")
# (name, rank, alpha, use_rslora): ranks 4, 8, 16 with different alphas, plus one rsLoRA.
SPECS = [("a_r4", 4, 8, False), ("b_r8", 8, 32, False), ("c_r16", 16, 16, False), ("d_rs8", 8, 4, True)]
SUFFIX = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


# ΔW references are computed on a sample of modules (every kind, first/middle/last layer): float64 matmuls on a
# shared 2-core box are the slow part; bit-exact equality of the reloaded pytree covers every module.
SAMPLE = [f"model.layers.{i}.{'mlp' if m == 'down_proj' else 'self_attn'}.{m}" for i in (0, 17, 29) for m in TARGETS]


def reference_delta(folder: Path, paths=None) -> dict[str, np.ndarray]:
    """ΔW per module from the raw files, in float64: scale * B @ A with PEFT's scale (alpha/r or alpha/sqrt(r))."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    raw = load_file(str(folder / "adapter_model.safetensors"))
    parts: dict[str, dict[str, np.ndarray]] = {}
    for k, v in raw.items():
        path, ab = SUFFIX.match(k).groups()
        parts.setdefault(path, {})[ab] = v.astype(np.float64)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return {p: s * (d["B"] @ d["A"]) for p, d in parts.items() if paths is None or p in paths}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, make_peft_adapter) -> Path:
    root = tmp_path_factory.mktemp("loras")
    for i, (name, r, alpha, rs) in enumerate(SPECS):
        make_peft_adapter(root / name, rank=r, alpha=alpha, target_modules=TARGETS, seed=i, use_rslora=rs)
    (root / "notes").mkdir()  # a non-adapter subfolder is ignored
    (root / "README.txt").write_text("not an adapter")
    return root


@pytest.fixture(scope="module")
def pop(lora_dir) -> Population:
    return load_population(lora_dir)


# ------------------------------------------------------------------------------------------------------ round trip
@pytest.mark.slow
def test_load_stacks_pads_and_preserves_delta_w(pop, lora_dir):
    names = [s[0] for s in SPECS]
    assert pop.meta.names == tuple(names)
    assert pop.meta.rank == 16 and pop.size == 4
    assert pop.meta.target_modules == tuple(sorted(TARGETS))
    assert list(pop.factors) == sorted(pop.factors) and len(pop.factors) == 30 * len(TARGETS)
    leaf = pop.factors["model.layers.3.mlp.down_proj"]
    assert leaf["A"].shape == (4, 16, 1536) and leaf["B"].shape == (4, 576, 16)
    assert pop.factors["model.layers.0.self_attn.k_proj"]["B"].shape == (4, 192, 16)
    assert leaf["A"].dtype == jnp.float32
    for i, (name, r, _, _) in enumerate(SPECS):
        raw_paths = {k.split(".lora_")[0][len("base_model.model."):]
                     for k in load_file(str(lora_dir / name / "adapter_model.safetensors"))}
        assert raw_paths == set(pop.factors)
        ref = reference_delta(lora_dir / name, SAMPLE)
        for path in SAMPLE:
            got = np.asarray(delta_weight(pop, i, path), np.float64)
            np.testing.assert_allclose(got, ref[path], rtol=1e-5, atol=1e-7 * np.abs(ref[path]).max())
            # zero padding beyond the adapter's own rank
            assert not np.any(np.asarray(pop.factors[path]["A"][i, r:]))
            assert not np.any(np.asarray(pop.factors[path]["B"][i, :, r:]))
    assert effective_ranks(pop) == [r for _, r, _, _ in SPECS]


@pytest.mark.slow
def test_export_round_trip_is_exact_and_config_honest(pop, lora_dir, tmp_path):
    paths = export_population(pop, tmp_path / "out")
    assert [p.name for p in paths] == list(pop.meta.names)
    for p, (name, r, _, _) in zip(paths, SPECS):
        cfg = json.loads((p / "adapter_config.json").read_text())
        orig = json.loads((lora_dir / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["r"] == r and cfg["lora_alpha"] == r and cfg["use_rslora"] is False  # padding trimmed, scale 1
        assert cfg["target_modules"] == sorted(TARGETS) and cfg["bias"] == "none"
        assert cfg["base_model_name_or_path"] == orig["base_model_name_or_path"]
        ref, got = reference_delta(lora_dir / name, SAMPLE), reference_delta(p, SAMPLE)
        assert len(ref) == len(SAMPLE)
        for path in ref:
            np.testing.assert_allclose(got[path], ref[path], rtol=1e-5, atol=1e-7 * np.abs(ref[path]).max())
    back = load_population(tmp_path / "out")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           back.factors, pop.factors)  # fp32 -> fp32 export is bit-exact
    assert back.meta == pop.meta
    # untrimmed export keeps the padded rank and the same ΔW
    q = export_adapter(pop, 0, tmp_path / "untrimmed", trim=False)
    assert json.loads((q / "adapter_config.json").read_text())["r"] == 16
    one = ["model.layers.5.mlp.down_proj"]
    np.testing.assert_allclose(reference_delta(q, one)[one[0]], reference_delta(lora_dir / "a_r4", one)[one[0]],
                               rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_rank_and_alpha_patterns_match_peft_delta_weight(make_peft_adapter, smollm2_fp32, tmp_path):
    """rank_pattern / alpha_pattern folded as PEFT does: compare with peft's own get_delta_weight."""
    from peft import PeftModel

    src = make_peft_adapter(tmp_path / "pat", rank=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=7,
                            rank_pattern={"q_proj": 4, "model.layers.3.self_attn.v_proj": 2},
                            alpha_pattern={"v_proj": 5})
    p = load_population([src])
    assert p.meta.rank == 8
    pm = PeftModel.from_pretrained(smollm2_fp32, src)
    try:
        mods = dict(pm.base_model.model.named_modules())
        for path in ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj",
                     "model.layers.9.self_attn.v_proj"):
            want = mods[path].get_delta_weight("default").double().numpy()
            got = np.asarray(delta_weight(p, 0, path), np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
        assert mods["model.layers.3.self_attn.v_proj"].r["default"] == 2  # the pattern really took effect
    finally:
        pm.unload()


@pytest.mark.slow
def test_exported_adapter_gives_same_logits_in_peft(pop, lora_dir, smollm2_fp32, smollm2_tokenizer, tmp_path):
    import torch
    from peft import PeftModel

    # short real prompts (CPU time on a shared box is the cost here), one padded batch
    enc = smollm2_tokenizer(["The capital of France is", "Write a haiku about the sea:", "2 + 3 ="],
                            return_tensors="pt", padding=True)
    with torch.no_grad():
        base = smollm2_fp32(**enc).logits
    for i in (0, 3):  # rank 4 and the rsLoRA adapter
        exported = export_adapter(pop, i, tmp_path / f"exp{i}")
        pm = PeftModel.from_pretrained(smollm2_fp32, lora_dir / SPECS[i][0], adapter_name="orig")
        try:
            pm.load_adapter(exported, adapter_name="exp")
            pm.eval()
            with torch.no_grad():
                pm.set_adapter("orig")
                want = pm(**enc).logits
                pm.set_adapter("exp")
                got = pm(**enc).logits
        finally:
            pm.unload()
        mask = enc["attention_mask"].bool()
        assert (want - base)[mask].abs().max() > 1e-2  # the adapter really changes the model
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # unload() restored the shared base model
        torch.testing.assert_close(smollm2_fp32(**enc).logits, base)


def test_bf16_adapter_loads_and_exports_bf16(tmp_path, toy):
    import ml_dtypes

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 6)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((5, 2)).astype(ml_dtypes.bfloat16)
    toy.write(tmp_path / "x", toy.cfg(r=2, lora_alpha=4), {toy.key(0, "q_proj", "A"): a, toy.key(0, "q_proj", "B"): b})
    p = load_population(tmp_path / "x")
    want = 2.0 * b.astype(np.float64) @ a.astype(np.float64)
    np.testing.assert_allclose(np.asarray(delta_weight(p, 0, "model.layers.0.self_attn.q_proj")), want, rtol=1e-6)
    out = export_adapter(p, 0, tmp_path / "y", dtype=jnp.bfloat16)
    assert load_file(str(out / "adapter_model.safetensors"))[toy.key(0, "q_proj", "A")].dtype == ml_dtypes.bfloat16


# ------------------------------------------------------------------------------------------ small hand-made cases
@pytest.fixture
def toy_dir(tmp_path, toy) -> Path:
    root = tmp_path / "pop"
    toy.write(root / "p0", toy.cfg(), toy.tensors(seed=0))
    toy.write(root / "p1", toy.cfg(r=4, lora_alpha=1), toy.tensors(r=4, seed=1))
    return root


def test_toy_population_shapes_and_summary(toy_dir, toy):
    p = validate_population(load_population(toy_dir))
    assert p.meta == PopulationMeta(base_model="toy", target_modules=("q_proj", "v_proj"), rank=4, names=("p0", "p1"))
    s = population_summary(p)
    assert s["P"] == 2 and s["ranks"] == [2, 4] and s["rank"] == 4 and s["modules"] == 4
    assert s["params_per_individual"] == 4 * 4 * (6 + 4)
    assert s["params"] == 2 * s["params_per_individual"] and s["bytes"] == 4 * s["params"]
    raw = load_file(str(toy_dir / "p1" / "adapter_model.safetensors"))
    want = 0.25 * raw[toy.key(1, "v_proj", "B")].astype(np.float64) @ raw[toy.key(1, "v_proj", "A")]
    np.testing.assert_allclose(np.asarray(delta_weight(p, 1, "model.layers.1.self_attn.v_proj")), want, rtol=1e-6)


def test_list_of_paths_single_folder_and_duplicate_names(toy_dir, tmp_path, toy):
    p = load_population([toy_dir / "p1", toy_dir / "p0"])
    assert p.meta.names == ("p1", "p0")
    one = load_population(toy_dir / "p0")
    assert one.size == 1 and one.meta.rank == 2
    other = toy.write(tmp_path / "elsewhere" / "p0", toy.cfg(), toy.tensors(seed=3))
    assert load_population([toy_dir / "p0", other]).meta.names == ("p0", "p0-1")


def test_population_is_a_pytree_and_jits(toy_dir):
    p = load_population(toy_dir)
    leaves, treedef = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 8  # meta is static
    doubled = jax.jit(lambda q: q.replace(factors=jax.tree_util.tree_map(lambda x: 2 * x, q.factors)))(p)
    assert doubled.meta == p.meta
    np.testing.assert_array_equal(np.asarray(doubled.factors["model.layers.0.self_attn.q_proj"]["A"]),
                                  2 * np.asarray(p.factors["model.layers.0.self_attn.q_proj"]["A"]))


def test_validate_population_catches_nan_and_bad_shapes(toy_dir):
    p = load_population(toy_dir)
    path = "model.layers.1.self_attn.q_proj"
    bad = dict(p.factors)
    bad[path] = {"A": p.factors[path]["A"].at[1, 0, 0].set(jnp.nan), "B": p.factors[path]["B"]}
    with pytest.raises(UserError, match=r"layers\.1\.self_attn\.q_proj\.A: individual 1 \(p1\)"):
        validate_population(p.replace(factors=bad))
    bad[path] = {"A": p.factors[path]["A"][:, :3], "B": p.factors[path]["B"]}
    with pytest.raises(UserError, match=r"q_proj: A \(2, 3, 6\)"):
        validate_population(p.replace(factors=bad))


# ---------------------------------------------------------------------------------------------------- bad inputs
BAD_CASES = ["missing_config", "invalid_json", "unreadable_config", "binary_config", "bad_pattern", "pickle", "base_model", "target_modules",
             "rank_vs_config", "d_in_mismatch", "nan", "inf", "empty", "not_lora", "dora", "symlink_escape",
             "missing_dir", "corrupt_safetensors", "foreign_tensor"]


@pytest.mark.parametrize("kind", BAD_CASES)
def test_bad_input_raises_user_error_naming_the_culprit(kind, tmp_path, toy):
    lora_dir, pattern = toy.bad_case(kind, tmp_path / "pop")
    with pytest.raises(UserError, match=pattern) as e:
        load_population(lora_dir)
    assert "\n" not in str(e.value)


def test_symlink_inside_lora_dir_is_allowed(toy_dir):
    os.symlink(toy_dir / "p0", toy_dir / "p2")
    assert load_population(toy_dir).meta.names == ("p0", "p1", "p2")


# -------------------------------------------------------------------------------------------- atomic export + hash
def test_export_refuses_to_clobber_and_leaves_nothing_half_written(toy_dir, tmp_path, monkeypatch):
    p = load_population(toy_dir)
    precious = tmp_path / "out" / "precious"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"precious: exists and is not an adapter folder"):
        export_adapter(p, 0, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    # an existing adapter folder is replaced
    dst = export_adapter(p, 0, tmp_path / "out" / "child")
    export_adapter(p, 1, dst)
    assert json.loads((dst / "adapter_config.json").read_text())["r"] == 4
    # a failure mid-write leaves neither a partial folder nor temp folders, and the old adapter intact
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(UserError, match=r"new: cannot write the adapter \(disk full\)"):  # one line, names it
        export_adapter(p, 0, tmp_path / "out" / "new")
    with pytest.raises(UserError):
        export_adapter(p, 0, dst)
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["child", "precious"]
    assert json.loads((dst / "adapter_config.json").read_text())["r"] == 4


def test_adapter_hash_tracks_content(toy_dir, tmp_path):
    p = load_population(toy_dir)
    h0 = adapter_hash(export_adapter(p, 0, tmp_path / "x"))
    assert adapter_hash(export_adapter(p, 0, tmp_path / "y")) == h0  # same content, other folder
    cfg_path = tmp_path / "y" / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text())))  # whitespace does not matter
    assert adapter_hash(tmp_path / "y") == h0
    assert adapter_hash(export_adapter(p, 1, tmp_path / "z")) != h0
    path = "model.layers.0.self_attn.q_proj"
    f = dict(p.factors)
    f[path] = {"A": p.factors[path]["A"].at[0, 0, 0].add(1e-3), "B": p.factors[path]["B"]}
    assert adapter_hash(export_adapter(p.replace(factors=f), 0, tmp_path / "w")) != h0


def test_export_population_names(toy_dir, tmp_path):
    p = load_population(toy_dir)
    out = export_population(p, tmp_path / "o", names=["x", "y"])
    assert [q.name for q in out] == ["x", "y"]
    with pytest.raises(UserError, match="2 names given for a population of 2|unique"):
        export_population(p, tmp_path / "o", names=["x", "x"])
    with pytest.raises(UserError, match="out of range"):
        export_adapter(p, 2, tmp_path / "o" / "z")
