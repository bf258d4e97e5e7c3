"""Metrics: answer normalisation, exact/numeric match, DROP-style token F1, option probabilities, task weights.

Pure Python (no numpy needed): these run once per sample on short strings.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Mapping, Sequence

from evaluators.errors import UserError

_ARTICLES = frozenset(("a", "an", "the"))
_PUNCT = set(string.punctuation)


# ----------------------------------------------------------------------------------------------- numbers
def parse_number(text: str) -> float | None:
    """'1,234' / '$12.50' / '-3' / '7.' -> float; None when `text` is not one number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if t.endswith("%"):
        t = t[:-1]
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def canonical_number(text: str) -> str:
    """Canonical string of a number ('36,000' -> '36000', '2.50' -> '2.5', '3.0' -> '3'); text unchanged if not a number."""
    v = parse_number(text)
    if v is None:
        return text.strip()
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def numeric_match(pred: str, gold: str, tol: float = 1e-6) -> bool:
    """True when both parse as numbers and agree within `tol` (absolute, or relative for big numbers)."""
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return False
    return abs(p - g) <= tol * max(1.0, abs(g))


# ------------------------------------------------------------------------------------------ DROP / free text
_EDGE = "".join(sorted(_PUNCT - {"-"}))
_NUMBER_TOKEN = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalize_token(tok: str) -> str:
    # numbers compare by value ("2.0" == "2", "93.5." == "93.5"); everything else loses its punctuation
    core = tok.strip(_EDGE).rstrip("-")
    if _NUMBER_TOKEN.fullmatch(core):
        return canonical_number(core)
    return "".join(ch for ch in tok if ch not in _PUNCT)


def normalize_answer(text: str) -> str:
    """Lower-case, split on whitespace, strip punctuation from each token (a number keeps its sign and decimal point
    and is canonicalised: '2.0' -> '2', '1,000' -> '1000'), drop the articles a/an/the and empty tokens, join."""
    toks = [_normalize_token(t) for t in text.lower().split()]
    return " ".join(t for t in toks if t and t not in _ARTICLES)


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 when normalize_answer(pred) equals normalize_answer of any accepted answer."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def token_f1(pred: str, gold: str) -> float:
    """Bag-of-tokens F1 between normalised answers: 2PR/(P+R) with P = overlap/|pred|, R = overlap/|gold|.
    Both empty -> 1.0; exactly one empty -> 0.0."""
    p, g = answer_tokens(pred), answer_tokens(gold)
    if not p or not g:
        return float(p == g)
    overlap = sum((collections.Counter(p) & collections.Counter(g)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return 2 * precision * recall / (precision + recall)


def max_f1(pred: str, golds: Sequence[str]) -> float:
    """Token F1 against the best-matching accepted answer."""
    return max(token_f1(pred, g) for g in golds)


def normalize_short(text: str) -> str:
    """Normalisation for short exact-match answers (nlgraph, custom exact-match files): numbers by value,
    otherwise lower-case with surrounding punctuation/quotes/whitespace stripped and inner whitespace collapsed."""
    t = " ".join(text.strip().split())
    if parse_number(t) is not None:
        return canonical_number(t)
    return t.strip(" .,:;!?\"'`*").lower()


# --------------------------------------------------------------------------------------- option probabilities
def softmax(logprobs: Sequence[float]) -> tuple[float, ...]:
    """Probabilities over the options (renormalised among them); -inf log-probs get probability 0."""
    m = max(logprobs)
    if not math.isfinite(m):
        raise ValueError(f"no finite option log-probability in {list(logprobs)}")
    e = [math.exp(x - m) for x in logprobs]
    s = sum(e)
    return tuple(x / s for x in e)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the lowest index (deterministic)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def per_byte(logprobs: Sequence[float], continuations: Sequence[str]) -> tuple[float, ...]:
    """lm-eval's acc_norm values: each option's log-probability divided by its continuation's length in UTF-8
    bytes (the continuation as scored, leading space included)."""
    if len(logprobs) != len(continuations):
        raise ValueError(f"{len(logprobs)} log-probs for {len(continuations)} continuations")
    return tuple(lp / len(c.encode("utf-8")) for lp, c in zip(logprobs, continuations))


# -------------------------------------------------------------------------------------------------- weights
def normalize_weights(weights: Sequence[float] | None, n_tasks: int, names: Sequence[str] | None = None
                      ) -> tuple[tuple[float, ...], str | None]:
    """Validate task weights and normalise them to sum 1.

    Returns (weights, note): note is a one-line message when the weights were rescaled (None otherwise).
    None -> equal weights. Refuses (UserError): count != n_tasks, negative or non-finite values, sum <= 0.
    """
    label = f" for tasks {list(names)}" if names is not None else ""
    if n_tasks < 1:
        raise UserError("no tasks given: need at least one task to compute fitness")
    if weights is None:
        return tuple(1.0 / n_tasks for _ in range(n_tasks)), None
    w = [float(x) for x in weights]
    if len(w) != n_tasks:
        raise UserError(f"task_weights has {len(w)} values but there are {n_tasks} tasks{label}: give one weight per task")
    for i, x in enumerate(w):
        if not math.isfinite(x) or x < 0:
            raise UserError(f"task_weights value {i + 1} is {x}: weights must be finite and >= 0")
    s = sum(w)
    if s <= 0:
        raise UserError(f"task_weights {w} sum to {s}: at least one weight must be > 0")
    if abs(s - 1.0) > 1e-9:
        return tuple(x / s for x in w), f"task weights {w} sum to {s:g}; normalised to sum 1"
    return tuple(w), None


def weighted_fitness(task_results: Mapping[str, "object"] | Sequence["object"], weights: Sequence[float] | None = None
                     ) -> float:
    """Weighted sum of task scores (weights validated and normalised, see normalize_weights).

    task_results: a sequence of TaskResult (or plain floats) or a mapping name -> TaskResult, in the order of `weights`.
    NaN scores propagate (a failed evaluation is never selected).
    """
    items = list(task_results.values()) if isinstance(task_results, Mapping) else list(task_results)
    names = list(task_results.keys()) if isinstance(task_results, Mapping) else None
    w, _ = normalize_weights(weights, len(items), names)
    scores = [float(getattr(r, "score", r)) for r in items]
    return float(sum(wi * si for wi, si in zip(w, scores)))
