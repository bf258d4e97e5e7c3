"""Request/response types between tasks and backends (plain dataclasses: they cross a process boundary as JSON), and
the one interface every scoring backend implements (`ScoringBackend`).

Tasks build requests from items; a backend answers them for one adapter (or the base model); tasks score answers.
The `Evaluator` (evaluators/backends/base.py) owns the loop task -> requests -> backend -> score, with the result
cache in front; backends only answer requests. The backends: the managed vLLM worker, a pool of them, Ray actors,
external endpoints, and the in-process JAX scorer (genome_jax.models.scorer.JaxScorer, which satisfies the protocol
structurally: genome_jax never imports evaluators).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class ChoiceRequest:
    """Score each option as a continuation of the prompt by log-probability (lm-eval-harness style).

    prompt: the full prompt text, chat template already applied by the task when its prompt uses one (backends
    never re-template). options: continuation strings, e.g. [" A", " B", " C", " D"] (choice_logprob) or option
    texts [" grow and reproduce", ...] (loglik; WinoGrande builds one request per option, with one continuation).
    Tokens: prompt = tokenizer.encode(prompt) with the tokenizer's defaults (as vLLM tokenises a text prompt);
    option j = tokenizer.encode(options[j], add_special_tokens=False), appended after the prompt tokens.
    ChoiceResponse.logprobs[j] = sum of log P(option token | prompt + earlier option tokens), unnormalised
    (the task normalises over options). evaluators/reference.py is the transformers implementation of this.
    """

    prompt: str
    options: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ChoiceResponse:
    logprobs: tuple[float, ...]  # sum of token log-probs of each option given the prompt


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompt: str  # full prompt text (chat template already applied)
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerateResponse:
    text: str


Request = ChoiceRequest | GenerateRequest
Response = ChoiceResponse | GenerateResponse


class AdapterHandle(Protocol):
    """An adapter held in a backend's own memory instead of a PEFT folder (the JAX backend's children during a run:
    no export). The evaluator reads only `key`, the content hash that keys the result cache; what else the handle
    carries is for the backend that accepts it (genome_jax.models.scorer.InMemoryAdapter: the LoRA factors)."""

    key: str


# What a backend is asked to answer: one job per distinct individual,
#   (adapter: PEFT folder path | AdapterHandle | None = the base model, content key | None for the base, requests).
Job = tuple[Any, str | None, list[Request]]


class ScoringBackend(Protocol):
    """The one interface of a scoring backend. Answers requests; knows nothing about tasks or the result cache."""

    kind: str  # "managed", "managed-pool", "ray", "endpoints", "jax"

    def start(self) -> Any:
        """Start the engine(s) now (idempotent), so start-up is timed on its own; returns the engine's info dict
        ({"mode": ..., "dtype": ...}; a list of them for several engines; None when the engines are not ours)."""

    def numerics(self, mode: str | None = None) -> str:
        """"route:dtype" of the engine that answers a call with this `mode`, e.g. "swap:bfloat16", "jax:float32";
        part of the result-cache key, so answers computed with other numerics are never reused."""

    def answer(self, jobs: Sequence[Job], *, mode: str | None = None, timeout_s: float | None = None,
               on_progress: Callable[[int], None] | None = None) -> tuple[list[list[Response]], dict]:
        """One list of responses per job, in job order (each aligned with the job's requests), and a timing dict.
        mode: the route ("swap" | "lora" for vLLM; None = the backend's default); on_progress(k): k jobs done.
        A backend refuses an adapter kind or request type it cannot score with UserError."""

    def close(self) -> None:
        """Release the engine(s); the backend may be started again."""


def to_json(obj: Any) -> dict:
    d = dataclasses.asdict(obj)
    d["__type__"] = type(obj).__name__
    return d


_TYPES = {t.__name__: t for t in (ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse)}


def from_json(d: dict) -> Any:
    d = dict(d)
    cls = _TYPES[d.pop("__type__")]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})
