"""Request/response types between tasks and backends (plain dataclasses: they cross a process boundary as JSON).

Tasks build requests from items; a backend answers them for one adapter (or the base model); tasks score answers.
"""
from __future__ import annotations

import dataclasses
from typing import Any


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
