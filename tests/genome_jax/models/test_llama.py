"""The JAX Llama against transformers (and transformers + peft for LoRA): tiny random checkpoints for the fast
tests, the real SmolLM2-135M for the slow ones."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genome_jax.errors import UserError
from genome_jax.models import llama

TARGETS = ("q_proj", "v_proj", "down_proj")


def peft_factors(peft_model, n_layers: int) -> dict:
    """Contract 1 factors of one peft adapter (P = 1), scale folded into B: an independent conversion."""
    sd = peft_model.state_dict()
    scale = peft_model.peft_config["default"].lora_alpha / peft_model.peft_config["default"].r
    out = {}
    for key, val in sd.items():
        if ".lora_A." in key:
            path = key.split("base_model.model.", 1)[1].split(".lora_A.")[0]
            b = sd[key.replace("lora_A", "lora_B")]
            out[path] = {"A": jnp.asarray(val.numpy()[None]), "B": jnp.asarray(b.numpy()[None] * scale)}
    return dict(sorted(out.items()))


def random_factors(key, cfg, n_pop: int, rank: int, targets=TARGETS, scale: float = 0.05) -> dict:
    out = {}
    for layer in range(cfg.num_layers):
        for name in targets:
            key, ka, kb = jax.random.split(key, 3)
            d_out, d_in = cfg.module_shape(name)
            out[llama.module_path(layer, name)] = {
                "A": scale * jax.random.normal(ka, (n_pop, rank, d_in)),
                "B": scale * jax.random.normal(kb, (n_pop, d_out, rank)),
            }
    return dict(sorted(out.items()))


def test_config_refuses_unsupported(tmp_path):
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UserError, match="attention_bias"):
        llama.LlamaConfig.from_hf({**base, "attention_bias": True})
    with pytest.raises(UserError, match="rope_scaling type 'llama3'"):
        llama.LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "llama3"}})
    with pytest.raises(UserError, match="config.json: not found"):
        llama.load_params(tmp_path)


@pytest.mark.parametrize("jit", [False, True])
def test_logits_match_transformers(tiny, jit):
    _, model, cfg, params = tiny
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 12))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    fwd = jax.jit(llama.forward, static_argnames="config") if jit else llama.forward
    out = np.asarray(fwd(params, jnp.asarray(tokens), config=cfg))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_left_padding_with_mask_matches_transformers(tiny):
    _, model, cfg, params = tiny
    rs = np.random.RandomState(1)
    tokens = rs.randint(0, cfg.vocab_size, (2, 9))
    mask = np.ones_like(tokens)
    mask[0, :4] = 0  # left padding of the first row
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = model(
            torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    out = np.asarray(
        llama.forward(params, jnp.asarray(tokens), config=cfg, positions=jnp.asarray(positions),
                      attention_mask=jnp.asarray(mask))
    )
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=1e-5, rtol=0)


def test_population_matches_separate_single_adapter_forwards(tiny):
    _, _, cfg, params = tiny
    n_pop = 4
    factors = random_factors(jax.random.key(0), cfg, n_pop, rank=4)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 10)))
    fwd = jax.jit(llama.forward, static_argnames="config")
    pop = np.asarray(fwd(params, tokens, config=cfg, lora=llama.stack_lora(factors, cfg)))
    assert pop.shape == (n_pop, 2, 10, cfg.vocab_size)
    base = np.asarray(fwd(params, tokens, config=cfg))
    for p in range(n_pop):
        one = jax.tree.map(lambda x: x[p : p + 1], factors)
        single = np.asarray(fwd(params, tokens, config=cfg, lora=llama.stack_lora(one, cfg)))[0]
        np.testing.assert_allclose(pop[p], single, atol=1e-5, rtol=0)
        assert np.abs(pop[p] - base).max() > 1e-3  # the adapter matters


def test_population_does_not_copy_base_weights(tiny):
    """The jaxpr of the population forward never broadcasts a base weight along the population axis."""
    _, _, cfg, params = tiny
    n_pop = 5
    lora = llama.stack_lora(random_factors(jax.random.key(1), cfg, n_pop, rank=2), cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, lo: llama.hidden_states(p, tokens, config=cfg, lora=lo))(params, lora)
    weight_shapes = {tuple(w.shape[1:]) for w in params["layers"].values() if w.ndim == 3}
    text = str(jaxpr)
    for d_out, d_in in weight_shapes:
        assert f"[{n_pop},{d_out},{d_in}]" not in text.replace(" ", "")


def test_one_adapter_matches_transformers_peft(tiny):
    from peft import LoraConfig, get_peft_model

    _, model, cfg, params = tiny
    torch.manual_seed(3)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False, lora_dropout=0.0)
    pm = get_peft_model(model, peft_cfg).eval()
    try:
        tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 11))
        with torch.no_grad():
            ref = pm(torch.tensor(tokens)).logits.numpy()
        factors = peft_factors(pm, cfg.num_layers)
        assert len(factors) == cfg.num_layers * len(TARGETS)
        out = np.asarray(llama.forward(params, jnp.asarray(tokens), config=cfg, lora=llama.stack_lora(factors, cfg)))[0]
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
        base = np.asarray(llama.forward(params, jnp.asarray(tokens), config=cfg))
        assert np.abs(out - base).max() > 1e-2  # the comparison is not vacuous
    finally:
        pm.unload()  # give the module-scoped model back without LoRA layers


def test_stack_unstack_roundtrip_and_missing_layers(tiny):
    _, _, cfg, _ = tiny
    factors = random_factors(jax.random.key(2), cfg, 2, rank=3, targets=("k_proj",))
    del factors[llama.module_path(1, "k_proj")]  # an adapter that skips layer 1
    stacked = llama.stack_lora(factors, cfg)
    assert stacked["k_proj"]["A"].shape == (cfg.num_layers, 2, 3, cfg.hidden_size)
    assert float(jnp.abs(stacked["k_proj"]["B"][1]).max()) == 0.0
    back = llama.unstack_lora(stacked, cfg)
    for path, ab in factors.items():
        np.testing.assert_array_equal(back[path]["A"], ab["A"])
        np.testing.assert_array_equal(back[path]["B"], ab["B"])
    with pytest.raises(UserError, match="do not fit"):
        llama.stack_lora({llama.module_path(0, "q_proj"): factors[llama.module_path(0, "k_proj")]}, cfg)
    with pytest.raises(UserError, match="not a linear layer"):
        llama.stack_lora({"model.layers.99.self_attn.q_proj": factors[llama.module_path(0, "k_proj")]}, cfg)


def test_segment_ids_equal_separate_sequences(tiny):
    """Two sequences packed into one row (segment ids, positions restarting) give the logits of separate runs."""
    _, _, cfg, params = tiny
    rs = np.random.RandomState(4)
    a, b = rs.randint(0, cfg.vocab_size, 5), rs.randint(0, cfg.vocab_size, 7)
    row = jnp.asarray(np.concatenate([a, b, [0, 0]])[None])
    seg = jnp.asarray(np.array([1] * 5 + [2] * 7 + [0, 0])[None])
    pos = jnp.asarray(np.concatenate([np.arange(5), np.arange(7), [0, 0]])[None])
    packed = np.asarray(llama.forward(params, row, config=cfg, positions=pos, segment_ids=seg))[0]
    sep_a = np.asarray(llama.forward(params, jnp.asarray(a[None]), config=cfg))[0]
    sep_b = np.asarray(llama.forward(params, jnp.asarray(b[None]), config=cfg))[0]
    np.testing.assert_allclose(packed[:5], sep_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[5:12], sep_b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- the real SmolLM2
def _mmlu_batch(tokenizer, n=4):
    from evaluators.tasks import get_task

    task = get_task("mmlu")
    reqs = task.build_requests(task.load("dev", n), "choice_logprob")
    enc = [tokenizer(r.prompt)["input_ids"] for r in reqs]
    t = max(len(e) for e in enc)
    ids = np.full((len(enc), t), tokenizer.pad_token_id or 0)
    mask = np.zeros(ids.shape, bool)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = e
        mask[i, : len(e)] = True
    return ids, mask


@pytest.mark.slow
def test_smollm2_logits_match_transformers_fp32_and_bf16(model_path, smollm2_tokenizer, smollm2_fp32):
    """Right-padded real MMLU prompts; only real positions compared. fp32: max |Δlogit| < 1e-3 (measured ~1.1e-4 on
    logits up to ~40). bf16 (both sides bf16): max |Δlogit| < 2 and >= 90% top-1 agreement (measured ~1.0, 96%):
    rounding order differs between XLA and torch."""
    from transformers import AutoModelForCausalLM

    ids, mask = _mmlu_batch(smollm2_tokenizer)
    fwd = jax.jit(llama.forward, static_argnames="config")
    with torch.no_grad():
        ref = smollm2_fp32(torch.tensor(ids)).logits.numpy()
    cfg, params = llama.load_params(model_path, dtype=jnp.float32)
    assert (cfg.num_kv_heads, cfg.num_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (3, 9, 100000.0, True)
    out = np.asarray(fwd(params, jnp.asarray(ids), config=cfg))
    assert np.abs(out - ref)[mask].max() < 1e-3

    ref16 = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        r16 = ref16(torch.tensor(ids)).logits.float().numpy()
    cfg, p16 = llama.load_params(model_path, dtype=jnp.bfloat16)
    o16 = np.asarray(fwd(p16, jnp.asarray(ids), config=cfg))
    assert np.abs(o16 - r16)[mask].max() < 2.0
    assert (o16.argmax(-1) == r16.argmax(-1))[mask].mean() >= 0.9
    assert np.abs(o16 - out)[mask].mean() < 0.2  # bf16 stays near the fp32 answer


@pytest.mark.slow
def test_smollm2_population_matches_peft(model_path, smollm2_tokenizer, smollm2_fp32, make_peft_adapter, tmp_path):
    """Two real PEFT adapters (different ranks/alphas/targets) loaded as one population: each individual's logits
    equal transformers + peft with that adapter."""
    from peft import PeftModel

    from genome_jax.population import load_population

    make_peft_adapter(tmp_path / "a", rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=1,
                      scale=5.0)
    make_peft_adapter(tmp_path / "b", rank=8, alpha=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=2,
                      scale=5.0)
    pop = load_population(tmp_path)
    ids, mask = _mmlu_batch(smollm2_tokenizer, n=2)
    cfg, params = llama.load_params(model_path)
    out = np.asarray(jax.jit(llama.forward, static_argnames="config")(
        params, jnp.asarray(ids), config=cfg, lora=llama.stack_lora(pop.factors, cfg)))
    with torch.no_grad():
        base = smollm2_fp32(torch.tensor(ids)).logits.numpy()
    for p, name in enumerate(pop.meta.names):
        pm = PeftModel.from_pretrained(smollm2_fp32, tmp_path / name).eval()
        try:
            with torch.no_grad():
                ref = pm(torch.tensor(ids)).logits.numpy()
        finally:
            pm.unload()
        assert np.abs(ref - base)[mask].max() > 0.05  # the adapter changes the logits
        assert np.abs(out[p] - ref)[mask].max() < 1e-3


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_lora_delta_gradients_equal_the_definition(jit):
    """The custom backward of llama.lora_delta (a layout fix) against numpy gradients of y = (x A^T) B^T for a loss
    sum(y * c): dB = c^T h, dA = (c B)^T x, dx = (c B) A, with h = x A^T."""
    rs = np.random.RandomState(0)
    x, a, b, c = (rs.randn(*s).astype(np.float32) for s in ((2, 3, 5, 7), (2, 4, 7), (2, 6, 4), (2, 3, 5, 6)))

    def loss(x, a, b):
        return jnp.sum(llama.lora_delta(x, a, b) * c)

    g = jax.grad(loss, argnums=(0, 1, 2))
    dx, da, db = (np.asarray(t) for t in (jax.jit(g) if jit else g)(x, a, b))
    h = np.einsum("pbti,pri->pbtr", x, a)
    gh = np.einsum("pbto,por->pbtr", c, b)
    np.testing.assert_allclose(db, np.einsum("pbto,pbtr->por", c, h), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da, np.einsum("pbtr,pbti->pri", gh, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum("pbtr,pri->pbti", gh, a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(llama.lora_delta(x, a, b)), np.einsum("pbtr,por->pbto", h, b), rtol=1e-5,
                               atol=1e-5)
