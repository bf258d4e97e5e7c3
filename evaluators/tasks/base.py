"""The task interface and its result type (the registry: tasks.registry; lookup by name or path: tasks.builtin).

A task turns items into protocol requests and answers into a TaskResult:
    items = task.load(split, n)                       # validated, tagged with _split/_index
    requests = task.build_requests(items, task.mode)  # final prompt text inside
    responses = backend.answer(requests)              # one Response per Request, same order
    result = task.score(items, responses, task.mode)  # TaskResult
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

from evaluators.errors import UserError
from evaluators.protocol import Request, Response
from evaluators.tasks.prompts import Formatter, as_formatter

GENERATE = "generate"
CHOICE_LOGPROB = "choice_logprob"
LOGLIK = "loglik"  # multiple choice by the log-likelihood of each option's text (lm-eval's acc / acc_norm)
MODES = (GENERATE, CHOICE_LOGPROB, LOGLIK)

MULTIPLE_CHOICE = "multiple_choice"
EXACT_MATCH = "exact_match"
FREE_ANSWER = "free_answer"
KINDS = (MULTIPLE_CHOICE, EXACT_MATCH, FREE_ANSWER)

Item = dict  # one task item (a JSON object); load() adds "_split" and "_index"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Settings of `generate` requests. temperature 0 = greedy; with temperature > 0 request i gets seed + i."""

    max_tokens: int | None = None  # None: the task's own default
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Scores of one individual on one task split; per-sample fields are aligned with the scored items.

    predictions[i]: canonical answer of sample i (an option label, a canonical number, a normalised string; ""
      when none could be extracted). Equal predictions of the same sample always score the same, so the ensemble
      can vote on them.
    per_sample[i]: the sample's score in [0, 1] (1/0 correctness; token F1 for free-answer tasks).
    option_probs[i]: choice_logprob and loglik: probabilities of the options (softmax over the values the prediction
      is the argmax of: option log-probs, or under loglik with acc_norm log-probs per byte), in the order of
      options[i]; None otherwise.
    """

    task: str
    split: str
    mode: str
    score: float  # the fitness metric: mean of per_sample
    metrics: dict[str, float]
    predictions: tuple[str, ...]
    per_sample: tuple[float, ...]
    references: tuple[str, ...]  # gold answer per sample (first accepted answer for free-answer tasks)
    ids: tuple[str, ...]  # item id, or "<split>[<index>]" when the item has none
    option_probs: tuple[tuple[float, ...], ...] | None = None
    options: tuple[tuple[str, ...], ...] | None = None  # option labels per sample (multiple choice)
    raw: tuple[str, ...] | None = None  # generated text per sample (generate mode)

    @property
    def n(self) -> int:
        return len(self.predictions)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TaskResult":
        def tup(x):
            return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x

        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (dict(v) if k == "metrics" else tup(v)) for k, v in d.items() if k in fields})


class Task:
    """Base class of every task. Subclasses implement load_data, build_requests and score.

    Constructor arguments (all keyword, all optional):
      formatter: PromptFormatter / model path / function str -> str (needed to build chat prompts).
      mode: "generate", "choice_logprob" or "loglik" (default: the task's `default_mode`).
      generation: GenerationConfig for generate mode.
      data_dir: folder holding the task's JSON file (file-backed tasks; default: the files shipped in evaluators/data).
    """

    name: str = "task"
    kind: str = EXACT_MATCH
    modes: tuple[str, ...] = (GENERATE,)
    default_mode: str = GENERATE
    default_max_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __init__(self, *, formatter: Formatter | str | None = None, mode: str | None = None,
                 generation: GenerationConfig | None = None, data_dir: str | os.PathLike | None = None):
        self.formatter = as_formatter(formatter)
        self.mode = self.check_mode(mode or self.default_mode)
        self.generation = generation or GenerationConfig()
        self.data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))

    # ------------------------------------------------------------------------- the three methods to implement
    def load_data(self, split: str) -> list[Item]:
        raise NotImplementedError

    def build_requests(self, items: Sequence[Item], mode: str | None = None) -> list[Request]:
        raise NotImplementedError

    def score(self, items: Sequence[Item], responses: Sequence[Response], mode: str | None = None) -> TaskResult:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- helpers
    def load(self, split: str, n: int | None = None) -> list[Item]:
        """load_data(split), first n items (the files are pre-shuffled), each tagged with _split and _index."""
        items = self.load_data(split)
        if n is not None:
            if n < 1:
                raise UserError(f"n must be >= 1, got {n}")
            items = items[:n]
        return [it if ("_split" in it and "_index" in it) else {**it, "_split": split, "_index": i}
                for i, it in enumerate(items)]

    def check_mode(self, mode: str | None) -> str:
        mode = mode or self.mode
        if mode not in self.modes:
            raise UserError(f"task '{self.name}' has no scoring mode '{mode}' (available: {', '.join(self.modes)})")
        return mode

    def format(self, user_message: str) -> str:
        """The chat prompt for one user message (through the task's formatter)."""
        if self.formatter is None:
            raise UserError(f"task '{self.name}' needs a prompt formatter for chat prompts: "
                            "get_task(..., formatter=model_path) or a function str -> str")
        return self.formatter(user_message)

    def generation_kwargs(self, index: int) -> dict[str, Any]:
        """GenerateRequest fields for the index-th request (seed varies per request when sampling)."""
        g = self.generation
        return dict(max_tokens=g.max_tokens or self.default_max_tokens, temperature=g.temperature,
                    seed=(g.seed + index) if g.temperature > 0 else None, stop=tuple(self.stop))

    def make_result(self, items: Sequence[Item], *, mode: str, predictions: Sequence[str], per_sample: Sequence[float],
                    references: Sequence[str], metrics: dict[str, float] | None = None,
                    option_probs: Sequence[Sequence[float]] | None = None,
                    options: Sequence[Sequence[str]] | None = None, raw: Sequence[str] | None = None) -> TaskResult:
        """Assemble a TaskResult; score = mean(per_sample), split/ids read from the items' tags."""
        n = len(items)
        for name, seq in (("predictions", predictions), ("per_sample", per_sample), ("references", references)):
            if len(seq) != n:
                raise ValueError(f"{self.name}: {len(seq)} {name} for {n} items")
        score = sum(per_sample) / n if n else float("nan")
        splits = {it.get("_split", "unknown") for it in items}
        split = splits.pop() if len(splits) == 1 else "mixed"
        ids = tuple(str(it["id"]) if "id" in it else f"{it.get('_split', split)}[{it.get('_index', i)}]"
                    for i, it in enumerate(items))
        return TaskResult(
            task=self.name, split=split, mode=mode, score=float(score),
            metrics={"accuracy": float(score)} if metrics is None else dict(metrics),
            predictions=tuple(predictions), per_sample=tuple(float(x) for x in per_sample),
            references=tuple(str(r) for r in references), ids=ids,
            option_probs=None if option_probs is None else tuple(tuple(float(p) for p in ps) for ps in option_probs),
            options=None if options is None else tuple(tuple(o) for o in options),
            raw=None if raw is None else tuple(raw))

    @staticmethod
    def check_responses(requests_or_items: Sequence, responses: Sequence[Response], kind: type) -> None:
        if len(responses) != len(requests_or_items):
            raise ValueError(f"{len(responses)} responses for {len(requests_or_items)} items")
        for r in responses:
            if not isinstance(r, kind):
                raise TypeError(f"expected {kind.__name__}, got {type(r).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, mode={self.mode!r})"
