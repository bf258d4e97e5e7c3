"""`genome merge`: the written folder loads in PEFT with the expected ΔW (ties against peft's merge_utils, delta-space
linear against the truncated SVD), bad input fails with one line and writes nothing; one slow test runs the merged
adapter of the real SmolLM2 in vLLM and compares its greedy tokens with transformers + PEFT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as mu

from scripts import cli

MODS = ("q_proj", "v_proj")


def _write_toys(toy, root, alphas=(2, 6), seeds=(0, 1)):
    dirs = []
    for i, (alpha, seed) in enumerate(zip(alphas, seeds)):
        dirs.append(toy.write(root / f"ad{i}", toy.cfg(lora_alpha=alpha), toy.tensors(seed=seed)))
    return dirs


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=6, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


def _peft_delta(folder) -> dict:
    """ΔW per (layer, module) as PEFT computes it after loading `folder` onto a tiny Llama of the toy shapes."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_tiny_llama(), str(folder))
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            layer = int(name.split("layers.")[1].split(".")[0])
            out[(layer, name.rsplit(".", 1)[-1])] = mod.get_delta_weight("default").detach().numpy()
    return out


def _scaled(toy, alphas, seeds, layer, mod, r=2):
    """(A, s B) of each toy adapter at one module (PEFT scale s = alpha / r folded into B)."""
    As, Bs = [], []
    for alpha, seed in zip(alphas, seeds):
        t = toy.tensors(seed=seed)
        As.append(t[toy.key(layer, mod, "A")].astype(np.float64))
        Bs.append(t[toy.key(layer, mod, "B")].astype(np.float64) * alpha / r)
    return As, Bs


def test_merge_ties_count_loads_in_peft_with_peft_ties_deltas(toy, tmp_path, capsys):
    alphas, seeds, w = (2, 6), (0, 1), [0.6, 0.4]
    dirs = _write_toys(toy, tmp_path, alphas, seeds)
    out = tmp_path / "merged"
    rc = cli.main(["merge", "--method", "ties", "--density", "0.5", "--normalize", "count", "--weights", *map(str, w),
                   "--out", str(out), *map(str, dirs)])
    assert rc == 0, capsys.readouterr().err
    assert "merged 2 adapters with ties" in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and sorted(cfg["target_modules"]) == list(MODS)
    got = _peft_delta(out)
    assert set(got) == {(layer, m) for layer in (0, 1) for m in MODS}
    wt = torch.tensor(w, dtype=torch.float32)
    for (layer, mod), delta in got.items():
        As, Bs = _scaled(toy, alphas, seeds, layer, mod)
        a = mu.ties([torch.tensor(x, dtype=torch.float32) for x in As], wt, 0.5).numpy()
        b = mu.ties([torch.tensor(x, dtype=torch.float32) for x in Bs], wt, 0.5).numpy()
        np.testing.assert_allclose(delta, b @ a, rtol=1e-5, atol=1e-6)


def _peft_file_deltas(folder) -> dict:
    """{module key: ΔW = (lora_alpha / r) B @ A} read straight from a PEFT folder's safetensors (float64)."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert not cfg.get("use_rslora") and not cfg.get("alpha_pattern") and not cfg.get("rank_pattern")
    t = load_file(str(folder / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / cfg["r"]
    return {k[: -len(".lora_A.weight")]: s * t[k.replace("lora_A", "lora_B")].astype(np.float64) @ v.astype(np.float64)
            for k, v in t.items() if k.endswith(".lora_A.weight")}


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory, make_peft_adapter):
    """A real PEFT adapter of SmolLM2 (q/v of layers 0-1: small, so each merge compiles fast)."""
    return make_peft_adapter(tmp_path_factory.mktemp("selfmerge") / "a", rank=8, alpha=16, seed=4, scale=3.0,
                             layers_to_transform=[0, 1])


SELF_MERGE_CASES = [(m, "factors") for m in ("ties", "dare_ties", "dare_linear", "linear", "task_arithmetic", "slerp")]
SELF_MERGE_CASES += [("ties", "delta")]


@pytest.mark.parametrize("method,space", SELF_MERGE_CASES, ids=[f"{m}-{s}" for m, s in SELF_MERGE_CASES])
def test_merging_an_adapter_with_itself_returns_its_delta(smollm2_adapter, tmp_path, capsys, method, space):
    """`genome merge --method M --weights 0.5 0.5 --density 1 --out OUT A A` (the default normalisation) writes A's
    ΔW back (issue 11: PEFT's count normalisation gave a quarter of it for ties)."""
    out = tmp_path / "merged"
    rc = cli.main(["merge", "--method", method, "--space", space, "--weights", "0.5", "0.5", "--density", "1",
                   "--out", str(out), str(smollm2_adapter), str(smollm2_adapter)])
    assert rc == 0, capsys.readouterr().err
    want, got = _peft_file_deltas(smollm2_adapter), _peft_file_deltas(out)
    assert set(got) == set(want) and len(want) == 4
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=f"{method} {k}")


def test_merge_delta_linear_is_the_best_rank_r_update(toy, tmp_path, capsys):
    alphas, seeds, w = (2, 6), (0, 1), [0.25, 0.75]
    dirs = _write_toys(toy, tmp_path, alphas, seeds)
    out = tmp_path / "merged"
    rc = cli.main(["merge", "--method", "linear", "--space", "delta", "--weights", *map(str, w), "--out", str(out),
                   *map(str, dirs)])
    assert rc == 0, capsys.readouterr().err
    for (layer, mod), delta in _peft_delta(out).items():
        As, Bs = _scaled(toy, alphas, seeds, layer, mod)
        dense = sum(wk * b @ a for wk, a, b in zip(w, As, Bs))
        U, S, Vt = np.linalg.svd(dense)
        np.testing.assert_allclose(delta, (U[:, :2] * S[:2]) @ Vt[:2], rtol=0, atol=1e-5 * np.abs(dense).max())


def test_merge_defaults_to_equal_weights_and_writes_bf16(toy, tmp_path, capsys):
    dirs = _write_toys(toy, tmp_path)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--method", "task_arithmetic", "--dtype", "bfloat16", "--out", str(out),
                     *map(str, dirs)]) == 0
    assert "weights [0.5, 0.5]" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


@pytest.mark.parametrize("argv,msg", [
    (["--weights", "0.5"], r"--weights: 1 values given for 2 adapters"),
    (["--density", "0"], r"merge density must be in \(0, 1\]"),
    (["--method", "slerp", "--t", "2"], r"merge t \(slerp\) must be in \[0, 1\]"),
])
def test_bad_input_is_one_line_and_writes_nothing(toy, tmp_path, argv, msg):
    import re

    dirs = _write_toys(toy, tmp_path)
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-m", "scripts.cli", "merge", *argv, "--out", str(out), *map(str, dirs)],
                         cwd=cli.__file__.rsplit("/scripts/", 1)[0], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genome: error: ") and re.search(msg, lines[0]), res.stderr
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_needs_two_adapters_and_refuses_a_foreign_out_folder(toy, tmp_path, capsys):
    dirs = _write_toys(toy, tmp_path)
    assert cli.main(["merge", "--out", str(tmp_path / "m"), str(dirs[0])]) == 1
    assert "at least 2 adapter folders" in capsys.readouterr().err
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    assert cli.main(["merge", "--out", str(foreign), *map(str, dirs)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (foreign / "todo.txt").read_text() == "keep me"


_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    if __name__ == "__main__":
        model, adapter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        llm = LLM(model=model, dtype="float32", enforce_eager=True, enable_lora=True, max_lora_rank=16,
                  max_model_len=256, max_num_seqs=2, seed=0)
        outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0),
                            lora_request=LoRARequest("merged", 1, adapter))
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


@pytest.mark.slow
def test_merged_smollm2_adapter_runs_in_vllm_like_in_peft(tmp_path, make_peft_adapter, model_path, smollm2_fp32,
                                                          smollm2_tokenizer):
    a = make_peft_adapter(tmp_path / "a", rank=8, alpha=16, seed=1, scale=3.0)
    b = make_peft_adapter(tmp_path / "b", rank=4, alpha=8, seed=2, scale=3.0)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--method", "ties", "--density", "0.5", "--weights", "0.6", "0.4", "--out", str(out),
                     str(a), str(b)]) == 0
    prompts = ["The capital of France is", "2 + 2 ="]
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(script), str(model_path), str(out), json.dumps(prompts)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    vllm_ids = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])

    from peft import PeftModel

    model = PeftModel.from_pretrained(smollm2_fp32, str(out))
    try:
        for prompt, ids in zip(prompts, vllm_ids):
            enc = smollm2_tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
            assert gen[0, enc["input_ids"].shape[1]:].tolist() == ids, prompt
    finally:
        model.unload()
