"""A Llama decoder as pure functions over a params pytree, with population LoRA in the forward pass.

Params layout (weights kept in the Hugging Face orientation W: (d_out, d_in), layers stacked for `lax.scan`):
    {"embed": (V, D), "final_norm": (D,), ["lm_head": (V, D) when embeddings are untied],
     "layers": {"input_norm": (L, D), "post_norm": (L, D),
                "q_proj": (L, Hq*hd, D), "k_proj": (L, Hkv*hd, D), "v_proj": (L, Hkv*hd, D), "o_proj": (L, D, Hq*hd),
                "gate_proj": (L, I, D), "up_proj": (L, I, D), "down_proj": (L, D, I)}}

Population LoRA (Contract 1 factors, scale folded into B) is restacked per module name for the scan:
    {"q_proj": {"A": (L, P, r, d_in), "B": (L, P, d_out, r)}, ...}
and every individual p computes y_p = x_p W^T + (x_p A_p^T) B_p^T: the base weights are shared by all P individuals
(one GEMM over the folded P*B*T rows), only the rank-r factors differ.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from genome_jax.errors import UserError

Params = dict[str, Any]

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Build from a Hugging Face LlamaConfig dict; refuses features this implementation does not have."""
        arch = d.get("model_type", "llama")
        if arch != "llama":
            raise UserError(f"{source}: model_type {arch!r} is not supported (only 'llama')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise UserError(f"{source}: {flag}=true is not supported")
        scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise UserError(f"{source}: rope_scaling type {rope_type!r} is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        heads = d["num_attention_heads"]
        # transformers 5 may keep rope_theta inside rope_parameters
        theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    def module_shape(self, name: str) -> tuple[int, int]:
        """(d_out, d_in) of the linear layer `name` (short name, e.g. "q_proj")."""
        d, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (self.num_heads * hd, d),
            "k_proj": (self.num_kv_heads * hd, d),
            "v_proj": (self.num_kv_heads * hd, d),
            "o_proj": (d, self.num_heads * hd),
            "gate_proj": (i, d),
            "up_proj": (i, d),
            "down_proj": (d, i),
        }[name]


def module_path(layer: int, name: str) -> str:
    """Contract 1 module path of linear `name` in decoder layer `layer`, e.g. model.layers.0.self_attn.q_proj."""
    block = "self_attn" if name in ATTN_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{name}"


def load_config(model_path: str | os.PathLike) -> LlamaConfig:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (is {model_path} a Hugging Face model folder?)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    return LlamaConfig.from_hf(d, source=str(path))


def _read_safetensors(model_path: Path) -> dict[str, np.ndarray]:
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_path}: no *.safetensors weights found")
    out: dict[str, np.ndarray] = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def load_params(model_path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[LlamaConfig, Params]:
    """Read a Hugging Face Llama checkpoint (safetensors) into the stacked params pytree, cast to `dtype`."""
    model_path = Path(model_path)
    cfg = load_config(model_path)
    raw = _read_safetensors(model_path)

    def get(key: str) -> np.ndarray:
        if key not in raw:
            raise UserError(f"{model_path}: tensor {key!r} missing from the safetensors weights")
        return raw[key]

    def stack(fmt: str) -> jax.Array:
        return jnp.asarray(np.stack([get(fmt.format(i)) for i in range(cfg.num_layers)]), dtype=dtype)

    layers = {
        "input_norm": stack("model.layers.{}.input_layernorm.weight"),
        "post_norm": stack("model.layers.{}.post_attention_layernorm.weight"),
    }
    for name in LORA_MODULES:
        layers[name] = stack(module_path(0, name).replace(".0.", ".{}.") + ".weight")
        want = (cfg.num_layers, *cfg.module_shape(name))
        if layers[name].shape != want:
            raise UserError(f"{model_path}: {name} has shape {layers[name].shape[1:]}, config says {want[1:]}")
    params: Params = {
        "embed": jnp.asarray(get("model.embed_tokens.weight"), dtype=dtype),
        "final_norm": jnp.asarray(get("model.norm.weight"), dtype=dtype),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(get("lm_head.weight"), dtype=dtype)
    return cfg, params


# ----------------------------------------------------------------------------------------------------------------
# population LoRA factors <-> per-module stacks


def stack_lora(factors: dict[str, dict[str, jax.Array]], config: LlamaConfig) -> dict[str, dict[str, jax.Array]]:
    """Contract 1 factors {module_path: {"A": (P, r, d_in), "B": (P, d_out, r)}} -> {name: {"A": (L, P, r, d_in),
    "B": (L, P, d_out, r)}}. Layers an adapter does not touch get zero factors (ΔW = 0)."""
    if not factors:
        return {}
    first = next(iter(factors.values()))
    n_pop, rank = first["A"].shape[0], first["A"].shape[1]
    known = {module_path(i, n): (i, n) for i in range(config.num_layers) for n in LORA_MODULES}
    names: dict[str, dict[int, dict[str, jax.Array]]] = {}
    for path, ab in factors.items():
        if path not in known:
            raise UserError(f"LoRA module {path!r} is not a linear layer of this Llama model")
        layer, name = known[path]
        want_a = (n_pop, rank, config.module_shape(name)[1])
        want_b = (n_pop, config.module_shape(name)[0], rank)
        if ab["A"].shape != want_a or ab["B"].shape != want_b:
            raise UserError(
                f"LoRA module {path!r}: A {ab['A'].shape} / B {ab['B'].shape} do not fit the model "
                f"(expected A {want_a}, B {want_b})"
            )
        names.setdefault(name, {})[layer] = ab
    out = {}
    for name, per_layer in sorted(names.items()):
        d_out, d_in = config.module_shape(name)
        dtype = next(iter(per_layer.values()))["A"].dtype
        za, zb = jnp.zeros((n_pop, rank, d_in), dtype), jnp.zeros((n_pop, d_out, rank), dtype)
        out[name] = {
            "A": jnp.stack([per_layer[i]["A"] if i in per_layer else za for i in range(config.num_layers)]),
            "B": jnp.stack([per_layer[i]["B"] if i in per_layer else zb for i in range(config.num_layers)]),
        }
    return out


def unstack_lora(stacked: dict[str, dict[str, jax.Array]], config: LlamaConfig) -> dict[str, dict[str, jax.Array]]:
    """Inverse of `stack_lora`: {name: {"A": (L, P, r, d_in), ...}} -> {module_path: {"A": (P, r, d_in), ...}}."""
    out = {}
    for name, ab in stacked.items():
        for i in range(config.num_layers):
            out[module_path(i, name)] = {"A": ab["A"][i], "B": ab["B"][i]}
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------------
# forward


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: (..., D). Normalise in fp32, scale in x's dtype (as transformers does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions: (B, T) int -> cos, sin: (B, T, head_dim) fp32, rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (P, B, T, H, hd); cos/sin: (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """x: (P, B, T, d_in), a: (P, r, d_in), b: (P, d_out, r) -> (P, B, T, d_out) = (x a^T) b^T.

    Same value as plain autodiff; the custom backward only fixes the layout of the B gradient: autodiff asks for
    dB = g^T h as (d_out, r), and XLA:CPU then transposes the whole (B*T, d_out) cotangent g before the GEMM
    (13 ms per MLP projection per layer here, a third of the train step). Computing dB^T = h^T g as (r, d_out)
    and transposing that small result instead is the same sum in the same order."""
    h = jnp.einsum("pbti,pri->pbtr", x, a)
    return jnp.einsum("pbtr,por->pbto", h, b)


def _lora_delta_fwd(x, a, b):
    h = jnp.einsum("pbti,pri->pbtr", x, a)
    return jnp.einsum("pbtr,por->pbto", h, b), (x, a, b, h)


def _lora_delta_bwd(res, g):
    x, a, b, h = res
    db_t = jax.lax.optimization_barrier(jnp.einsum("pbtr,pbto->pro", h, g))  # (P, r, d_out): no big transpose
    gh = jnp.einsum("pbto,por->pbtr", g, b)
    da = jnp.einsum("pbtr,pbti->pri", gh, x)
    dx = jnp.einsum("pbtr,pri->pbti", gh, a)
    return dx, da, jnp.swapaxes(db_t, 1, 2)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def linear(x: jax.Array, w: jax.Array, lora: dict[str, jax.Array] | None) -> jax.Array:
    """x: (P, B, T, d_in), w: (d_out, d_in) shared, lora A: (P, r, d_in), B: (P, d_out, r) -> (P, B, T, d_out)."""
    y = jnp.einsum("pbti,oi->pbto", x, w)
    if lora is not None:
        y = y + lora_delta(x, lora["A"].astype(x.dtype), lora["B"].astype(x.dtype))
    return y


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Causal grouped-query attention. q: (P, B, T, Hq, hd); k, v: (P, B, T, Hkv, hd); mask: (B, T, S) bool, extra
    restrictions on top of causality (padding keys, packed-segment boundaries), or None -> (P, B, T, Hq*hd)."""
    n_pop, b, t, hq, hd = q.shape
    hkv = k.shape[3]
    q = q.reshape(n_pop, b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("pbtkgh,pbskh->pbkgts", q, k).astype(jnp.float32) * (hd**-0.5)
    allowed = jnp.tril(jnp.ones((t, t), dtype=bool))
    if mask is not None:
        allowed = (allowed[None] & mask)[None, :, None, None]  # (1, B, 1, 1, T, S)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("pbkgts,pbskh->pbtkgh", probs, v)
    return out.reshape(n_pop, b, t, hq * hd)


def _layer(config: LlamaConfig, x, w, lora, cos, sin, mask):
    """One decoder layer. x: (P, B, T, D)."""
    n_pop, b, t, _ = x.shape
    hd = config.head_dim
    lo = lambda name: None if lora is None else lora.get(name)  # noqa: E731
    h = rms_norm(x, w["input_norm"], config.rms_norm_eps)
    q = linear(h, w["q_proj"], lo("q_proj")).reshape(n_pop, b, t, config.num_heads, hd)
    k = linear(h, w["k_proj"], lo("k_proj")).reshape(n_pop, b, t, config.num_kv_heads, hd)
    v = linear(h, w["v_proj"], lo("v_proj")).reshape(n_pop, b, t, config.num_kv_heads, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    x = x + linear(attention(q, k, v, mask), w["o_proj"], lo("o_proj"))
    h = rms_norm(x, w["post_norm"], config.rms_norm_eps)
    g = linear(h, w["gate_proj"], lo("gate_proj"))
    u = linear(h, w["up_proj"], lo("up_proj"))
    return x + linear(jax.nn.silu(g) * u, w["down_proj"], lo("down_proj"))


def hidden_states(
    params: Params,
    tokens: jax.Array,
    *,
    config: LlamaConfig,
    lora: dict[str, dict[str, jax.Array]] | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """Final-normed hidden states. tokens: (B, T) int; lora: `stack_lora` output for P individuals (or None);
    positions: (B, T) (default arange); attention_mask: (B, T) 1 = real token (None: no padding among the keys,
    e.g. right padding, whose pad positions never influence real ones under the causal mask); segment_ids: (B, T)
    int for packed rows (tokens attend only within their segment; pass positions restarting at each segment);
    remat: recompute each layer in the backward pass (less memory, ~1/3 more compute).
    Returns (P, B, T, D) with LoRA, (B, T, D) without."""
    b, t = tokens.shape
    n_pop = 1 if not lora else next(iter(lora.values()))["A"].shape[1]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)
    mask = None
    if attention_mask is not None:
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, t, t))
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = same if mask is None else mask & same
    x = jnp.take(params["embed"], tokens, axis=0)
    x = jnp.broadcast_to(x[None], (n_pop, *x.shape))

    def body(x, layer):
        w, lo = layer
        return _layer(config, x, w, lo, cos, sin, mask), None

    if remat:
        body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, (params["layers"], lora or None))
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return x if lora else x[0]


def lm_head(params: Params) -> jax.Array:
    """(V, D) output projection (the embedding matrix when tied)."""
    return params.get("lm_head", params["embed"])


def logits_from_hidden(params: Params, h: jax.Array) -> jax.Array:
    """h: (..., D) -> logits (..., V) in fp32."""
    return jnp.einsum("...d,vd->...v", h, lm_head(params).astype(h.dtype)).astype(jnp.float32)


def forward(
    params: Params,
    tokens: jax.Array,
    *,
    config: LlamaConfig,
    lora: dict[str, dict[str, jax.Array]] | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits: (B, T, V) without LoRA, (P, B, T, V) with a population (arguments as in `hidden_states`)."""
    h = hidden_states(params, tokens, config=config, lora=lora, positions=positions, attention_mask=attention_mask,
                      segment_ids=segment_ids)
    return logits_from_hidden(params, h)
