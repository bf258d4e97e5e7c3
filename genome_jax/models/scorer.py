"""JAX scoring backend for multiple-choice (`choice_logprob` and `loglik`) requests: every individual of a population
on N requests in jitted, batched forward passes, no PEFT export.

`JaxScorer` is one more scoring backend behind the evaluator (`evaluators.protocol.ScoringBackend`, satisfied
structurally: genome_jax never imports evaluators): `answer(jobs)` takes PEFT folders, in-memory adapters
(`InMemoryAdapter`: a run's children, no export) or None (the base model), and the evaluator owns the task loop and
the result cache. A request is anything with `.prompt: str` and `.options: tuple[str, ...]`
(evaluators.protocol.ChoiceRequest); the response class is passed in (`response_cls`).

Tokenisation is the vLLM backend's (evaluators/backends/worker.py) and the OpenAI completions convention:
prompt ids = encode(prompt) (the tokenizer's default special tokens), option ids = encode(option) without special
tokens, scored as prompt ids + option ids; an option's log-probability is the sum of its tokens' log-probs given
everything before them. When every option of a request is exactly one token (" A", " B", ...), the request costs
one sequence (all options are read off the same next-token distribution); otherwise each option gets its own.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genome_jax.errors import UserError
from genome_jax.models import llama
from genome_jax.population import load_population


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Host-side token layout of N requests.

    seqs[s]: token ids of sequence s (unpadded).
    targets[s]: list of (position, token_id, slot): log p(token_id | seq[:position+1]) adds to slot,
      slot = n * n_options_max + j (request n, option j).
    """

    seqs: list[list[int]]
    targets: list[list[tuple[int, int, int]]]
    n_requests: int
    n_options: tuple[int, ...]  # per request

    @property
    def n_options_max(self) -> int:
        return max(self.n_options, default=0)


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_requests(requests: Sequence[Any], tokenizer: Any) -> Encoded:
    """Tokenise choice requests into scoring sequences (see the module docstring)."""
    if not requests:
        raise UserError("no requests to score")
    n_max = max(len(r.options) for r in requests)
    seqs, targets, n_opts = [], [], []
    for n, req in enumerate(requests):
        if not req.options:
            raise UserError(f"request {n} has no options")
        ctx = _encode(tokenizer, req.prompt, True)
        if not ctx:
            raise UserError(f"request {n}: empty prompt")
        conts = [_encode(tokenizer, o, False) for o in req.options]
        for o, cont in zip(req.options, conts):
            if not cont:
                raise UserError(f"request {n}: option {o!r} encodes to no tokens")
        n_opts.append(len(req.options))
        if all(len(c) == 1 for c in conts):
            seqs.append(ctx)
            targets.append([(len(ctx) - 1, cont[0], n * n_max + j) for j, cont in enumerate(conts)])
        else:
            for j, cont in enumerate(conts):
                seqs.append(ctx + cont)
                targets.append([(len(ctx) - 1 + k, tok, n * n_max + j) for k, tok in enumerate(cont)])
    return Encoded(seqs=seqs, targets=targets, n_requests=len(requests), n_options=tuple(n_opts))


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded device batch. tokens: (B, T); gather_b, gather_t, gather_tok: (M,) int32; slot: (M,) int64 with
    -1 for padding entries."""

    tokens: np.ndarray
    gather_b: np.ndarray
    gather_t: np.ndarray
    gather_tok: np.ndarray
    slot: np.ndarray


def _bucket(n: int, step: int) -> int:
    return max(step, int(math.ceil(n / step)) * step)


def make_batches(enc: Encoded, *, batch_size: int, bucket: int, pad_id: int = 0) -> list[Batch]:
    """Sort sequences by length, cut into batches of `batch_size`, pad lengths up to a multiple of `bucket` and
    target lists up to a power of two, so only a few shapes ever get compiled."""
    order = sorted(range(len(enc.seqs)), key=lambda s: len(enc.seqs[s]))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        t = _bucket(max(len(enc.seqs[s]) for s in idx), bucket)
        tokens = np.full((batch_size, t), pad_id, np.int32)
        gb, gt, gtok, slot = [], [], [], []
        for b, s in enumerate(idx):
            tokens[b, : len(enc.seqs[s])] = enc.seqs[s]
            for pos, tok, sl in enc.targets[s]:
                gb.append(b), gt.append(pos), gtok.append(tok), slot.append(sl)
        m = 1 << max(0, (len(slot) - 1).bit_length())
        pad = m - len(slot)
        batches.append(Batch(
            tokens=tokens,
            gather_b=np.asarray(gb + [0] * pad, np.int32),
            gather_t=np.asarray(gt + [0] * pad, np.int32),
            gather_tok=np.asarray(gtok + [0] * pad, np.int32),
            slot=np.asarray(slot + [-1] * pad, np.int64),
        ))
    return batches


@functools.partial(jax.jit, static_argnames="config")
def token_logprobs(params, lora, tokens, gather_b, gather_t, gather_tok, *, config: llama.LlamaConfig):
    """log p(gather_tok[m] | tokens[gather_b[m], :gather_t[m]+1]) for each individual.

    tokens: (B, T); gather_*: (M,); lora: `llama.stack_lora` output for P individuals, or None -> (P, M) (P = 1
    without LoRA). Only the M gathered positions go through the (V, D) output projection."""
    h = llama.hidden_states(params, tokens, config=config, lora=lora)
    if not lora:
        h = h[None]
    h = h[:, gather_b, gather_t]  # (P, M, D)
    logp = jax.nn.log_softmax(llama.logits_from_hidden(params, h), axis=-1)  # (P, M, V)
    return jnp.take_along_axis(logp, gather_tok[None, :, None], axis=-1)[..., 0]


def score_encoded(params, config: llama.LlamaConfig, factors: dict | None, enc: Encoded, *, batch_size: int = 8,
                  bucket: int = 32, pad_id: int = 0, pop_chunk: int | None = 8,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Option log-probs (P, N, n_options_max) of P individuals (factors: Contract 1 dict, or None = base model,
    P = 1); NaN where a request has fewer options. pop_chunk bounds how many individuals share one pass (memory
    grows with P x batch_size x T); None = all at once. progress(k) is called with the number of scored targets."""
    n_pop = 1 if not factors else next(iter(factors.values()))["A"].shape[0]
    chunk = n_pop if not pop_chunk or not factors else min(pop_chunk, n_pop)
    j_max = enc.n_options_max
    out = np.zeros((n_pop, enc.n_requests * j_max), np.float64)
    batches = make_batches(enc, batch_size=batch_size, bucket=bucket, pad_id=pad_id)
    for start in range(0, n_pop, chunk):
        part = jax.tree.map(lambda x: x[start : start + chunk], factors) if factors else None
        lora = llama.stack_lora(part, config) if part else None
        for batch in batches:
            lp = np.asarray(token_logprobs(params, lora, batch.tokens, batch.gather_b, batch.gather_t,
                                           batch.gather_tok, config=config), np.float64)
            keep = batch.slot >= 0
            np.add.at(out, (slice(start, start + lp.shape[0]), batch.slot[keep]), lp[:, keep])
            if progress is not None:
                progress(int(keep.sum()) * lp.shape[0])
    out = out.reshape(n_pop, enc.n_requests, j_max)
    for n, k in enumerate(enc.n_options):
        out[:, n, k:] = np.nan
    return out


def score_population(params, config: llama.LlamaConfig, factors: dict | None, requests: Sequence[Any], tokenizer: Any,
                     *, batch_size: int = 8, bucket: int = 32, pop_chunk: int | None = 8) -> np.ndarray:
    """Log-probabilities (P, N, n_options_max) of every option of every request for every individual.

    params/config: `llama.load_params`; factors: Population.factors ({module_path: {"A": (P, r, d_in),
    "B": (P, d_out, r)}}, scale folded into B) or None for the base model alone (P = 1)."""
    enc = encode_requests(requests, tokenizer)
    return score_encoded(params, config, factors, enc, batch_size=batch_size, bucket=bucket,
                         pad_id=_pad_id(tokenizer), pop_chunk=pop_chunk)


def to_responses(logprobs: np.ndarray, requests: Sequence[Any], response_cls: Callable[..., Any]) -> list[list[Any]]:
    """(P, N, J) log-probs -> per individual, one response_cls(logprobs=tuple) per request (e.g. ChoiceResponse)."""
    return [[response_cls(logprobs=tuple(float(x) for x in logprobs[p, n, : len(r.options)]))
             for n, r in enumerate(requests)] for p in range(logprobs.shape[0])]


def _pad_id(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryAdapter:
    """An adapter handle for the JAX backend: one individual's LoRA factors in memory (no PEFT export).

    key: content hash (the evaluator's result-cache key; equal factors, equal key).
    factors: Contract 1 dict of ONE individual, {module_path: {"A": (1, r, d_in), "B": (1, d_out, r)}} (numpy or
    jax arrays, scale folded into B)."""

    key: str
    factors: dict


def _signature(factors: dict) -> tuple:
    """Structure and shapes without the population axis: adapters with equal signatures stack into one pass."""
    return tuple((path, ab, tuple(x.shape[1:]))
                 for path, mods in sorted(factors.items()) for ab, x in sorted(mods.items()))


class JaxScorer:
    """The `--backend jax` scoring backend: loads the model once, answers choice requests for adapters in batched
    forward passes (individuals that share their requests and shapes are stacked into one population pass).

        backend = JaxScorer(model_path, response_cls=ChoiceResponse)
        Evaluator(backend, model=model_path, max_lora_rank=None).evaluate([None, "/pool/a", InMemoryAdapter(...)],
                                                                          tasks, "dev", 200)
        backend.score(population.factors, requests)     # (P, N, J) option log-probs, the numeric core
    """

    kind = "jax"

    def __init__(self, model_path: str | os.PathLike, *, response_cls: Callable[..., Any] | None = None,
                 dtype: Any = jnp.float32, batch_size: int = 8, bucket: int = 32, pop_chunk: int | None = 8):
        """response_cls(logprobs=tuple) builds one answer (evaluators.protocol.ChoiceResponse); needed by `answer`."""
        from transformers import AutoTokenizer  # heavy (seconds): only this backend needs a tokenizer on the JAX side

        self.model_path = os.fspath(model_path)
        self.dtype = jnp.dtype(dtype)
        self.config, self.params = llama.load_params(self.model_path, dtype=self.dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a tokenizer from {self.model_path}: {e}") from None
        self.response_cls = response_cls
        self.batch_size, self.bucket, self.pop_chunk = batch_size, bucket, pop_chunk

    def score(self, factors: dict | None, requests: Sequence[Any]) -> np.ndarray:
        """Option log-probs (P, N, n_options_max) of the population `factors` (None: the base model, P = 1)."""
        return score_population(self.params, self.config, factors, requests, self.tokenizer,
                                batch_size=self.batch_size, bucket=self.bucket, pop_chunk=self.pop_chunk)

    # ---- the ScoringBackend interface (evaluators.protocol) ---------------------------------------------------------
    def start(self) -> dict:
        return {"mode": "jax", "dtype": self.dtype.name}  # loaded in the constructor: nothing to start

    def numerics(self, mode: str | None = None) -> str:
        return f"jax:{self.dtype.name}"

    def close(self) -> None:
        pass  # in-process: the params go with the object

    def answer(self, jobs: Sequence[tuple[Any, str | None, Sequence[Any]]], *, mode: str | None = None,
               timeout_s: float | None = None, on_progress: Callable[[int], None] | None = None):
        """jobs: [(adapter, content key | None, [choice request, ...]), ...] -> ([[response, ...], ...], timing).

        adapter: a PEFT folder path, an `InMemoryAdapter`, or None (the base model). Jobs with the same requests
        and the same factor shapes are scored together, `pop_chunk` individuals per pass. mode: this backend has one
        route (None or "auto"). timeout_s is not enforced: scoring runs in this process (a stop signal ends it)."""
        if self.response_cls is None:
            raise UserError("response_cls is needed to answer requests (e.g. evaluators.protocol.ChoiceResponse)")
        if mode not in (None, "auto", "jax"):
            raise UserError(f"mode {mode!r}: the JAX backend has one route (no swap or lora)")
        for _, _, reqs in jobs:
            for r in reqs:
                if not hasattr(r, "options"):
                    raise UserError(f"the JAX backend scores choice requests only (tasks in choice_logprob or loglik "
                                    f"mode), not {type(r).__name__}")
        t0 = time.perf_counter()
        groups: dict[tuple, list[tuple[int, dict | None]]] = {}  # (requests, signature) -> [(job index, factors)]
        for j, (adapter, _, reqs) in enumerate(jobs):
            factors = self._factors(adapter)
            sig = None if factors is None else _signature(factors)
            groups.setdefault((tuple(reqs), sig), []).append((j, factors))
        results: list = [None] * len(jobs)
        done = 0
        for (reqs, sig), members in groups.items():
            enc = encode_requests(reqs, self.tokenizer)
            step = 1 if sig is None else (self.pop_chunk or len(members))
            for start in range(0, len(members), step):
                part = members[start:start + step]
                stacked = None if sig is None else jax.tree.map(lambda *xs: np.concatenate(xs), *[f for _, f in part])
                lp = score_encoded(self.params, self.config, stacked, enc, batch_size=self.batch_size,
                                   bucket=self.bucket, pad_id=_pad_id(self.tokenizer), pop_chunk=None)
                for (j, _), resp in zip(part, to_responses(lp, reqs, self.response_cls)):
                    results[j] = resp
                done += len(part)
                if on_progress is not None:
                    on_progress(done)
        return results, {"score_s": time.perf_counter() - t0, "groups": len(groups)}

    @staticmethod
    def _factors(adapter: Any) -> dict | None:
        """One individual's factors (leaves with a population axis of 1, on the host), or None for the base."""
        if adapter is None:
            return None
        if isinstance(adapter, (str, os.PathLike)):
            factors = load_population([adapter]).factors
        elif isinstance(getattr(adapter, "factors", None), dict):
            factors = adapter.factors
        else:
            raise UserError(f"adapters: the JAX backend takes PEFT folders, InMemoryAdapter or None, not "
                            f"{type(adapter).__name__}")
        factors = jax.tree.map(np.asarray, factors)
        if any(x.ndim != 3 or x.shape[0] != 1 for x in jax.tree.leaves(factors)):
            raise UserError("adapters: an InMemoryAdapter holds ONE individual: factor leaves of shape (1, r, d_in) "
                            "and (1, d_out, r)")
        return factors
