"""Fixtures of the JAX model tests: tiny random Llama checkpoints written by transformers."""
from __future__ import annotations

import pytest
import torch

from genome_jax.models import llama


def make_tiny(path, tied: bool = True, seed: int = 0, vocab_size: int = 96):
    """A random LlamaForCausalLM (GQA, non-default RoPE theta) saved with save_pretrained; returns the torch model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    """(path, torch model, LlamaConfig, params) of a tiny checkpoint, tied and untied embeddings."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny(path, tied=request.param)
    cfg, params = llama.load_params(path)
    return path, model, cfg, params


@pytest.fixture(scope="session")
def make_tiny_llama():
    """Factory fixture: make_tiny_llama(path, tied=True, seed=0, vocab_size=96) -> torch model (saved at path)."""
    return make_tiny
