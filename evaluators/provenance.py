"""What an expert adapter was trained on, and the leakage check between experts and the tasks a run scores.

`genome train-experts` writes PROVENANCE_FILE into every adapter folder it makes:

    {"format": "genome-provenance/1",
     "entries": [{"task": "mmlu", "file": "/.../mmlu.json", "file_sha256": "<hex>", "split": "test",
                  "indices": [0, 1, ...], "item_sha256": ["<hex>", ...]}, ...]}

An item is identified by the sha256 of its text (`item_text`: passage, if any, and question, lower-cased, whitespace
collapsed), so a trained-on question is recognised in any file, split or order. `find_overlaps` compares the
trained-on hashes of each expert with the dev/test items of the tasks a run scores. An adapter without the file (a
user's own) has status "unknown"; a file that does not parse is "unparseable" and is not trusted.

Pure Python (json, hashlib): no JAX, no task classes. Items are the task files' dicts.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["FORMAT", "PROVENANCE_FILE", "file_sha256", "find_overlaps", "item_sha256", "item_text", "make_entry",
           "overlap_message", "read_provenance", "write_provenance"]

PROVENANCE_FILE = "genome_provenance.json"
FORMAT = "genome-provenance/1"
KNOWN, UNKNOWN, UNPARSEABLE = "known", "unknown", "unparseable"
_ENTRY_KEYS = ("task", "file", "file_sha256", "split", "indices", "item_sha256")


def item_text(item: Mapping[str, Any]) -> str:
    """The text that identifies an item: its passage (if any) then its question, lower-cased, whitespace collapsed."""
    if not isinstance(item, Mapping):
        raise ValueError(f"item must be a dict, got {type(item).__name__}")
    parts = [item.get(k) for k in ("passage", "question")]
    parts = [p for p in parts if isinstance(p, str) and p.strip()]
    if not parts:
        ident = f" (id {item['id']!r})" if "id" in item else ""
        raise ValueError(f"item{ident} has neither a 'passage' nor a 'question' string")
    return " ".join(" ".join(parts).lower().split())


def item_sha256(item: Mapping[str, Any]) -> str:
    """sha256 (hex) of item_text(item), UTF-8."""
    return hashlib.sha256(item_text(item).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_entry(task: str, file: str | os.PathLike | None, split: str, items: Sequence[Mapping[str, Any]]) -> dict:
    """One provenance entry for `items` of `split` of a task (file: its JSON file, or None for a task without one).
    indices: each item's `_index` (set by Task.load), else its position in `items`."""
    return {"task": str(task), "file": None if file is None else os.fspath(file),
            "file_sha256": None if file is None else file_sha256(file), "split": str(split),
            "indices": [int(it.get("_index", i)) for i, it in enumerate(items)],
            "item_sha256": [item_sha256(it) for it in items]}


def _is_sha(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _entry_problem(e: Any, where: str) -> str | None:
    """Why an entry is malformed (one phrase), or None."""
    if not isinstance(e, dict):
        return f"{where} must be an object, got {type(e).__name__}"
    missing = [k for k in _ENTRY_KEYS if k not in e]
    if missing:
        return f"{where} lacks {', '.join(repr(k) for k in missing)}"
    if not isinstance(e["task"], str) or not isinstance(e["split"], str):
        return f"{where}: 'task' and 'split' must be strings"
    if e["file"] is not None and not isinstance(e["file"], str):
        return f"{where}: 'file' must be a string or null"
    if e["file_sha256"] is not None and not _is_sha(e["file_sha256"]):
        return f"{where}: 'file_sha256' must be a sha256 hex string or null"
    if not isinstance(e["item_sha256"], list) or not all(_is_sha(h) for h in e["item_sha256"]):
        return f"{where}: 'item_sha256' must be a list of sha256 hex strings"
    idx = e["indices"]
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        return f"{where}: 'indices' must be a list of integers"
    if len(idx) != len(e["item_sha256"]):
        return f"{where}: {len(idx)} indices but {len(e['item_sha256'])} item hashes"
    return None


def write_provenance(adapter_dir: str | os.PathLike, entries: list[dict]) -> None:
    """Write adapter_dir/PROVENANCE_FILE atomically (temp file in the same folder, then rename).
    entries: [{"task", "file", "file_sha256", "split", "indices", "item_sha256"}, ...] (see make_entry)."""
    if not isinstance(entries, list):
        raise ValueError(f"entries must be a list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        problem = _entry_problem(e, f"entries[{i}]")
        if problem:
            raise ValueError(problem)
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ValueError(f"adapter_dir {folder}: not a folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{PROVENANCE_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "entries": entries}, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / PROVENANCE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_provenance(adapter_dir: str | os.PathLike) -> dict:
    """{"status": "known" | "unknown" | "unparseable", "entries": [...], "error": str | None}.

    unknown: no provenance file (an adapter trained elsewhere). unparseable: the file exists but cannot be read,
    is not JSON or not of this format; its entries are then [] (not trusted) and error says why."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.exists():
        return {"status": UNKNOWN, "entries": [], "error": None}

    def bad(why: str) -> dict:
        return {"status": UNPARSEABLE, "entries": [], "error": f"{path}: {why}"}

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return bad(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except (OSError, UnicodeDecodeError) as e:
        return bad(f"cannot be read ({type(e).__name__}: {e})")
    if not isinstance(data, dict):
        return bad(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        return bad(f"unknown format {data.get('format')!r} (expected {FORMAT!r})")
    entries = data.get("entries")
    if not isinstance(entries, list):
        return bad("'entries' must be a list")
    for i, e in enumerate(entries):
        problem = _entry_problem(e, f"entries[{i}]")
        if problem:
            return bad(problem)
    return {"status": KNOWN, "entries": entries, "error": None}


def find_overlaps(adapters: Mapping[str, str | os.PathLike],
                  task_items: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> list[dict]:
    """Items of the given tasks that an expert was trained on, by item text hash.

    adapters: {expert name: adapter folder}; task_items: {task name: {split: [item, ...]}}. Only experts whose
    provenance is "known" are compared. Returns one record per (expert, task, split) with at least one overlap:
    {"expert", "adapter", "task", "split", "n_overlap", "n_items", "indices" (the task items' _index, else
    position), "trained_on" (the expert's "task:split" entries that hold them)}, in the order given."""
    out = []
    for name, folder in adapters.items():
        prov = read_provenance(folder)
        if prov["status"] != KNOWN:
            continue
        trained: dict[str, set[str]] = {}
        for e in prov["entries"]:
            for h in e["item_sha256"]:
                trained.setdefault(h, set()).add(f"{e['task']}:{e['split']}")
        for task, splits in task_items.items():
            for split, items in splits.items():
                hits = [(int(it.get("_index", i)), trained[h]) for i, it in enumerate(items)
                        if (h := item_sha256(it)) in trained]
                if hits:
                    out.append({"expert": name, "adapter": os.fspath(folder), "task": task, "split": split,
                                "n_overlap": len(hits), "n_items": len(items), "indices": [i for i, _ in hits],
                                "trained_on": sorted(set().union(*(s for _, s in hits)))})
    return out


def overlap_message(overlaps: Sequence[dict]) -> str:
    """One line naming the first overlap (expert, task, split, how many items) and counting the others."""
    if not overlaps:
        return "no overlap"
    o = overlaps[0]
    more = f" (and {len(overlaps) - 1} more expert/task/split overlap{'s' * (len(overlaps) > 2)})" \
        if len(overlaps) > 1 else ""
    return (f"expert '{o['expert']}' was trained on {o['n_overlap']} of the {o['n_items']} {o['split']} items of task "
            f"'{o['task']}' (its training data: {', '.join(o['trained_on'])}){more}")
