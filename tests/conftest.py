"""Shared fixtures: the real SmolLM2-135M-Instruct checkpoint and real PEFT adapters built on it.

Add fixtures additively (other test modules depend on the ones here).
"""
from __future__ import annotations

import os

# Env defaults for every test process (and the subprocesses they start): offline hubs, a small vLLM CPU KV cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """Folder of the real SmolLM2-135M-Instruct HF checkpoint (fetched on first use; a failed fetch fails tests)."""
    from genome_jax.model_store import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def smollm2_fp32(model_path):
    """The base model in fp32 (transformers), loaded once per session. Whoever wraps it with peft must unload()
    afterwards (make_peft_adapter and the peft logits tests do)."""
    import torch
    from transformers import AutoModelForCausalLM

    # One intra-op thread: on a box shared by several jobs, 2 OpenMP threads spin at every barrier and a SmolLM2
    # forward took 10.8 s instead of 0.6 s (measured). Override with GENOME_TEST_TORCH_THREADS.
    torch.set_num_threads(int(os.environ.get("GENOME_TEST_TORCH_THREADS", "1")))
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def make_peft_adapter(smollm2_fp32) -> Callable[..., Path]:
    """Factory: a REAL PEFT LoRA adapter on SmolLM2, built with peft.get_peft_model and saved with save_pretrained.

    make_peft_adapter(out_dir, rank, alpha, target_modules=("q_proj", "v_proj"), seed=0, use_rslora=False,
                      rank_pattern=None, alpha_pattern=None, layers_to_transform=None, scale=1.0) -> out_dir

    A ~ N(0, 1/d_in) and B ~ N(0, (0.02*scale)^2), seeded, so ΔW is non-zero and changes the logits noticeably.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    def make(out_dir, rank: int, alpha: float, target_modules: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
             use_rslora: bool = False, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
             layers_to_transform: list[int] | None = None, scale: float = 1.0) -> Path:
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                         bias="none", task_type="CAUSAL_LM", use_rslora=use_rslora,
                         rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                         layers_to_transform=layers_to_transform)
        peft_model = get_peft_model(smollm2_fp32, cfg)
        try:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in sorted(peft_model.named_parameters()):
                    if ".lora_A." in name:
                        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                    elif ".lora_B." in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02 * scale)
            out = Path(out_dir)
            peft_model.save_pretrained(out, safe_serialization=True)
        finally:
            peft_model.unload()  # restores the shared base model (removes the LoRA layers)
        assert (out / "adapter_model.safetensors").is_file(), out
        assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
        return out

    return make


def run_cli(*args: str, env: dict | None = None, timeout: float = 300):
    """Run `python -m scripts.cli ARGS` in a subprocess from the repo root; returns CompletedProcess (text)."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cli():
    """`cli("inspect", DIR)` -> CompletedProcess of `python -m scripts.cli inspect DIR`."""
    return run_cli


# ------------------------------------------------------------------------------------------------------ toy adapters
# Tiny hand-written PEFT folders (d = 4..7, layers 0-1) for fast validation/CLI tests; real adapters come from
# make_peft_adapter. Exposed as the `toy` fixture: toy.cfg, toy.tensors, toy.write, toy.key, toy.bad_case.
def toy_key(layer: int, mod: str, ab: str) -> str:
    kind = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{kind}.{mod}.lora_{ab}.weight"


def toy_cfg(**kw) -> dict:
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "toy", "r": 2,
           "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_rslora": False}
    cfg.update(kw)
    return cfg


def toy_tensors(r=2, d_in=6, d_out=4, seed=0, mods=("q_proj", "v_proj"), layers=(0, 1)) -> dict:
    rng = np.random.default_rng(seed)
    t = {}
    for layer in layers:
        for m in mods:
            t[toy_key(layer, m, "A")] = rng.standard_normal((r, d_in)).astype(np.float32)
            t[toy_key(layer, m, "B")] = rng.standard_normal((d_out, r)).astype(np.float32)
    return t


def toy_write(folder: Path, cfg: dict | None, tensors: dict | None) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def toy_bad_case(kind: str, root: Path) -> tuple[Path, str]:
    """Build a broken population under root; returns (lora_dir, regex the error must match)."""
    good = lambda name, **kw: toy_write(root / name, toy_cfg(**kw), toy_tensors())
    good("a_good")
    if kind == "missing_config":
        toy_write(root / "b", None, toy_tensors())
        return root, r"b/adapter_config\.json: missing"
    if kind == "invalid_json":
        toy_write(root / "b", None, toy_tensors())
        (root / "b" / "adapter_config.json").write_text("{not json")
        return root, r"b/adapter_config\.json: invalid JSON"
    if kind == "unreadable_config":
        toy_write(root / "b", None, toy_tensors())
        (root / "b" / "adapter_config.json").mkdir()
        return root, r"b/adapter_config\.json: unreadable"
    if kind == "binary_config":
        toy_write(root / "b", None, toy_tensors())
        (root / "b" / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
        return root, r"b/adapter_config\.json: invalid JSON"
    if kind == "bad_pattern":
        good("b", rank_pattern={"q_proj": "four"})
        return root, r"b/adapter_config\.json: invalid rank_pattern"
    if kind == "pickle":
        toy_write(root / "b", toy_cfg(), None)
        (root / "b" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
        return root, r"b/adapter_model\.bin: pickle weights refused.*safetensors"
    if kind == "base_model":
        good("b", base_model_name_or_path="other/model")
        return root, r"b/adapter_config\.json: base_model_name_or_path 'other/model' differs"
    if kind == "target_modules":
        toy_write(root / "b", toy_cfg(target_modules=["q_proj", "k_proj"]), toy_tensors(mods=("q_proj", "k_proj")))
        return root, r"b/adapter_model\.safetensors: different target modules"
    if kind == "rank_vs_config":
        toy_write(root / "b", toy_cfg(r=4), toy_tensors(r=2))
        return root, r"b/adapter_model\.safetensors: .*q_proj has lora_A \(2, 6\).*disagrees with r=4"
    if kind == "d_in_mismatch":
        toy_write(root / "b", toy_cfg(), toy_tensors(d_in=7))
        return root, r"b/adapter_model\.safetensors: .* d_in x d_out = 7 x 4 but a_good has 6 x 4"
    if kind in ("nan", "inf"):
        t = toy_tensors()
        t[toy_key(1, "v_proj", "B")][2, 1] = np.nan if kind == "nan" else np.inf
        toy_write(root / "b", toy_cfg(), t)
        return root, rf"b/adapter_model\.safetensors: model\.layers\.1\.self_attn\.v_proj\.lora_B contains {'NaN' if kind == 'nan' else 'Inf'}"
    if kind == "empty":
        shutil.rmtree(root / "a_good")
        (root / "logs").mkdir()
        return root, r"pop: no PEFT adapter folders found"
    if kind == "not_lora":
        good("b", peft_type="IA3")
        return root, r"b/adapter_config\.json: peft_type is 'IA3'"
    if kind == "dora":
        good("b", use_dora=True)
        return root, r"b/adapter_config\.json: use_dora is set"
    if kind == "symlink_escape":
        outside = toy_write(root.parent / "outside" / "evil", toy_cfg(), toy_tensors())
        os.symlink(outside, root / "b")
        return root, r"pop/b: symlinked adapter folder points outside"
    if kind == "missing_dir":
        return root / "nope", r"pop/nope: no such directory"
    if kind == "corrupt_safetensors":
        toy_write(root / "b", toy_cfg(), None)
        (root / "b" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
        return root, r"b/adapter_model\.safetensors: unreadable safetensors file"
    if kind == "foreign_tensor":
        t = toy_tensors()
        t["base_model.model.lm_head.weight"] = np.zeros((3, 3), np.float32)
        toy_write(root / "b", toy_cfg(), t)
        return root, r"b/adapter_model\.safetensors: unexpected tensor 'base_model\.model\.lm_head\.weight'"
    raise AssertionError(kind)




@pytest.fixture(scope="session")
def toy():
    import types

    return types.SimpleNamespace(key=toy_key, cfg=toy_cfg, tensors=toy_tensors, write=toy_write,
                                 bad_case=toy_bad_case)


# pip settings that make every registry unreachable (fetch-model error paths, and proof that a cached fetch is offline)
UNREACHABLE_PIP = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull,
                   "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}


@pytest.fixture(scope="session")
def unreachable_pip_env() -> dict:
    return dict(UNREACHABLE_PIP)
