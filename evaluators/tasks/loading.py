"""Task files: location, kind inference and validation.

Format (see evaluators/data/README.md): a JSON object {"dev": [item, ...], "test": [item, ...], ...other keys}.
  multiple choice: {"question": str, "choices": {"A": str, ...} (or a list, labelled A, B, ...), "answer": label}
  exact match:     {"question": str, "answer": str or number}
  free answer:     {"question": str, "answers": [str, ...], "passage": str (optional)}   (DROP-like: EM and F1)
"id" is optional everywhere. Every problem raises UserError naming the file, the split and the item index (and id).
"""
from __future__ import annotations

import functools
import json
import os
import string
from typing import Any

from evaluators.errors import UserError
from evaluators.tasks.base import EXACT_MATCH, FREE_ANSWER, MULTIPLE_CHOICE

_LETTERS = string.ascii_uppercase


def default_data_dir() -> str:
    """The task files shipped inside the package (evaluators/data)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def task_file(name: str, data_dir: str | None = None) -> str:
    return os.path.join(os.path.expanduser(data_dir) if data_dir else default_data_dir(), f"{name}.json")


def splits_of(data: Any, path: str) -> dict[str, list]:
    """The list-valued top-level keys of a task file (its splits)."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: a task file must be a JSON object like {{\"dev\": [...], \"test\": [...]}}, "
                        f"got {type(data).__name__}")
    splits = {k: v for k, v in data.items() if isinstance(v, list)}
    if not splits:
        raise UserError(f"{path}: no splits found (expected lists under \"dev\" and \"test\")")
    return splits


def infer_kind(data: Any, path: str) -> str:
    """multiple choice when items have `choices`, free answer when they have `answers`, exact match otherwise."""
    for split, items in splits_of(data, path).items():
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise UserError(f"{_where(path, split, i, it)}: an item must be a JSON object, got {type(it).__name__}")
            if "choices" in it:
                return MULTIPLE_CHOICE
            if "answers" in it:
                return FREE_ANSWER
            return EXACT_MATCH
    raise UserError(f"{path}: every split is empty")


def _where(path: str, split: str, i: int, item: Any) -> str:
    ident = f" (id {item['id']!r})" if isinstance(item, dict) and "id" in item else ""
    return f"{path}: {split} item {i}{ident}"


def _nonempty_str(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def validate_item(item: Any, kind: str, where: str) -> dict:
    """A normalised copy of one item (choices as an ordered dict, answer as a string), or UserError."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: an item must be a JSON object, got {type(item).__name__}")
    if "question" not in item:
        raise UserError(f"{where}: missing field 'question'")
    if not _nonempty_str(item["question"]):
        raise UserError(f"{where}: 'question' must be a non-empty string")
    out = dict(item)
    if kind == MULTIPLE_CHOICE:
        for field in ("choices", "answer"):
            if field not in item:
                raise UserError(f"{where}: missing field '{field}'")
        choices = item["choices"]
        if isinstance(choices, list):
            if len(choices) > len(_LETTERS):
                raise UserError(f"{where}: at most {len(_LETTERS)} choices are supported, got {len(choices)}")
            choices = {_LETTERS[j]: c for j, c in enumerate(choices)}
        if not isinstance(choices, dict) or len(choices) < 2:
            raise UserError(f"{where}: 'choices' must map at least two labels to option texts")
        for label, text in choices.items():
            if not _nonempty_str(label) or any(ch.isspace() for ch in label):
                raise UserError(f"{where}: choice label {label!r} must be a non-empty word (e.g. 'A')")
            if not isinstance(text, str):
                raise UserError(f"{where}: choice {label!r} must be a string, got {type(text).__name__}")
        answer = item["answer"]
        if not isinstance(answer, str) or answer not in choices:
            raise UserError(f"{where}: answer {answer!r} is not one of the choices {list(choices)}")
        out["choices"] = dict(choices)
    elif kind == FREE_ANSWER:
        if "answers" not in item:
            raise UserError(f"{where}: missing field 'answers'")
        answers = item["answers"]
        if not isinstance(answers, list) or not answers or not all(_nonempty_str(a) for a in answers):
            raise UserError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
        if "passage" in item and not isinstance(item["passage"], str):
            raise UserError(f"{where}: 'passage' must be a string")
    else:
        if "answer" not in item:
            raise UserError(f"{where}: missing field 'answer'")
        answer = item["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
            raise UserError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
        out["answer"] = str(answer)
    return out


def read_json(path: str) -> Any:
    """json.load with a UserError naming the file (and line/column) on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"task file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read task file: {e}") from None


@functools.lru_cache(maxsize=32)
def _read_cached(path: str, mtime_ns: int, size: int) -> Any:
    return read_json(path)


def read_task_file(path: str) -> Any:
    """The parsed file (cached while the file is unchanged)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"task file not found: {path}") from None
    return _read_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def load_split(path: str, split: str, kind: str | None = None) -> list[dict]:
    """Validated copies of one split's items, tagged with _split and _index. kind None: inferred from the file."""
    data = read_task_file(path)
    splits = splits_of(data, path)
    kind = kind or infer_kind(data, path)
    if split not in splits:
        raise UserError(f"{path}: no split '{split}' (available: {', '.join(sorted(splits))})")
    items = splits[split]
    if not items:
        raise UserError(f"{path}: split '{split}' is empty")
    out = []
    for i, it in enumerate(items):
        v = validate_item(it, kind, _where(path, split, i, it))
        v["_split"], v["_index"] = split, i
        out.append(v)
    return out
