"""Result cache: an individual whose adapter bytes did not change (an elite) is never scored again.

Key = sha256 over (model, adapter content hash, task name, split, n, scoring mode, the requests themselves, and the
numerics of the engine that answers: route and dtype, e.g. "swap:bfloat16"), so a changed prompt template or data
file cannot serve a stale answer, and a run resumed with another --eval_mode / --eval_dtype never mixes fitness
computed with different numerics. The value is the list of backend responses; the
task re-scores them (cheap, and it keeps the cache independent of TaskResult's fields). Memory always; a folder too
when `directory` is given (one JSON file per key, written to a temp name and renamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

from evaluators.protocol import Request, Response, from_json, to_json


def requests_digest(requests: list[Request]) -> str:
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps(to_json(r), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(model: str, adapter_key: str, task: str, split: str, n: int | None, mode: str,
              requests_sha: str, numerics: str) -> str:
    """numerics: "route:dtype" of the answering engine (`Evaluator.numerics`)."""
    blob = json.dumps([model, adapter_key, task, split, n, mode, requests_sha, numerics])
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    def __init__(self, directory: str | None = None):
        self._mem: dict[str, list[Response]] = {}
        self.directory = directory
        self.hits = 0
        self.misses = 0
        if directory:
            os.makedirs(directory, exist_ok=True)

    def get(self, key: str) -> list[Response] | None:
        val = self._mem.get(key)
        if val is None and self.directory:
            path = os.path.join(self.directory, key + ".json")
            try:
                with open(path) as f:
                    val = [from_json(d) for d in json.load(f)]
                self._mem[key] = val
            except (OSError, ValueError, KeyError, TypeError):
                val = None  # absent or unreadable: score again
        if val is None:
            self.misses += 1
        else:
            self.hits += 1
        return val

    def put(self, key: str, responses: list[Response]) -> None:
        self._mem[key] = list(responses)
        if self.directory:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump([to_json(r) for r in responses], f)
                os.replace(tmp, os.path.join(self.directory, key + ".json"))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise

    def __len__(self) -> int:
        return len(self._mem)
