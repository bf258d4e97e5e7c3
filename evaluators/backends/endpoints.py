"""External OpenAI-compatible vLLM servers as the backend (`--endpoints http://host:port ...`).

Each server must run with LoRA enabled and runtime adapter updates allowed:
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank 16 --max-loras 8
and must see the adapter folders at the same paths (same machine or a shared file system). Individuals are spread
over the servers (each to the least busy one, `per_endpoint` individuals in flight on each server); per individual:
POST /v1/load_lora_adapter, one /v1/completions call per group of like requests (a list of token-id prompts, so
the server batches them), POST /v1/unload_lora_adapter. Choice options are scored exactly as in the managed worker
(`worker.choice_nodes`: one forward per node of the options' token trie, `logprob_token_ids` for the next tokens;
single-token options = one forward per question). Only the standard library is used (no vLLM in this process).
"""
from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

from evaluators.errors import EvaluatorCrashed, UserError
from evaluators.backends.worker import choice_nodes
from evaluators.protocol import ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse


class Endpoint:
    def __init__(self, url: str, timeout_s: float):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"endpoint {url!r}: expected http://host:port")
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.timeout_s = timeout_s
        self._tok_cache: dict[tuple[str, bool], list[int]] = {}
        self.base_model = None
        self.jobs_done = 0  # individuals scored on this server (all calls)

    def call(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise EvaluatorCrashed(f"endpoint {self.url}{path} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise EvaluatorCrashed(f"endpoint {self.url} is unreachable ({path}): {e}") from None
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def connect(self) -> str:
        models = self.call("GET", "/v1/models", timeout_s=30)
        data = (models or {}).get("data") or []
        # the base model is the entry without a parent (LoRA adapters list their base as `parent`)
        bases = [m["id"] for m in data if not m.get("parent")]
        if not bases:
            raise UserError(f"endpoint {self.url}: /v1/models lists no model")
        self.base_model = bases[0]
        return self.base_model

    def tokenize(self, text: str, special: bool) -> list[int]:
        key = (text, special)
        ids = self._tok_cache.get(key)
        if ids is None:
            out = self.call("POST", "/tokenize", {"model": self.base_model, "prompt": text,
                                                  "add_special_tokens": special})
            ids = self._tok_cache[key] = list(out["tokens"])
        return ids


class EndpointsBackend:
    kind = "endpoints"

    def __init__(self, endpoints: list[str], *, model: str | None = None, per_endpoint: int = 4,
                 request_timeout_s: float = 900.0, **_ignored):
        if not endpoints:
            raise UserError("endpoints: at least one http://host:port is needed")
        self.endpoints = [Endpoint(u, request_timeout_s) for u in endpoints]
        self.model = model
        self.per_endpoint = max(1, per_endpoint)
        self._connected = False
        self._names = itertools.count(1)
        self._lock = threading.Lock()

    def _connect(self) -> None:
        if not self._connected:
            for e in self.endpoints:
                e.connect()
            self._connected = True

    def start(self) -> None:
        """Check that every server answers before any work (an unreachable URL is the user's to fix). The servers'
        configuration is theirs: no engine info."""
        try:
            self._connect()
        except EvaluatorCrashed as e:
            raise UserError(f"endpoints: {e}") from None

    def numerics(self, mode: str | None = None) -> str:
        return "endpoints:server"  # the servers' dtype is theirs

    # ---- one individual on one endpoint -------------------------------------------------------------------------
    def _score(self, ep: Endpoint, model: str, requests: list) -> list:
        out: list = [None] * len(requests)
        groups: dict[tuple, list] = {}  # params key -> [(reader key, prompt token ids or text)]
        choice: dict[int, tuple] = {}  # request index -> (option token ids, {prefix: group key, position})
        for i, r in enumerate(requests):
            if isinstance(r, ChoiceRequest):
                pids = ep.tokenize(r.prompt, True)
                oids = [ep.tokenize(o, False) for o in r.options]
                where = {}
                for prefix, nexts in choice_nodes(r.options, oids).items():
                    members = groups.setdefault(("choice", tuple(nexts)), [])
                    where[prefix] = (("choice", tuple(nexts)), len(members))
                    members.append(pids + list(prefix))
                choice[i] = (oids, where)
            elif isinstance(r, GenerateRequest):
                key = ("gen", int(r.max_tokens), float(r.temperature), r.seed, tuple(r.stop))
                where = (key, len(groups.setdefault(key, [])))
                groups[key].append(r.prompt)
                choice[i] = (None, where)
            else:
                raise UserError(f"unknown request type {type(r).__name__}")
        answers: dict[tuple, list] = {}
        for key, prompts in groups.items():
            body = {"model": model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0}
            if key[0] == "choice":
                body.update(logprobs=len(key[1]), logprob_token_ids=list(key[1]), return_tokens_as_token_ids=True)
            else:
                _, max_tokens, temp, seed, stop = key
                body.update(max_tokens=max_tokens, temperature=temp)
                if seed is not None:
                    body["seed"] = seed
                if stop:
                    body["stop"] = list(stop)
            res = ep.call("POST", "/v1/completions", body)
            choices = sorted(res["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise EvaluatorCrashed(f"endpoint {ep.url}: {len(choices)} completions for {len(prompts)} prompts")
            answers[key] = choices
        for i, (oids, where) in choice.items():
            if oids is None:
                key, pos = where
                out[i] = GenerateResponse(answers[key][pos]["text"])
                continue
            vals = []
            for ids in oids:
                lp = 0.0
                for j, t in enumerate(ids):
                    key, pos = where[tuple(ids[:j])]
                    lp += float(answers[key][pos]["logprobs"]["top_logprobs"][0][f"token_id:{t}"])
                vals.append(lp)
            out[i] = ChoiceResponse(tuple(vals))
        return out

    def _job(self, ep: Endpoint, adapter: str | None, requests: list) -> list:
        if adapter is None:
            return self._score(ep, ep.base_model, requests)
        with self._lock:
            name = f"genome-ind{next(self._names)}"
        ep.call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": adapter})
        try:
            return self._score(ep, name, requests)
        finally:
            try:
                ep.call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, timeout_s=60)
            except EvaluatorCrashed:
                pass  # the server is gone or already forgot it; the scoring error (if any) says more

    # ---- the backend interface --------------------------------------------------------------------------------------
    def answer(self, jobs: list[tuple[str | None, str | None, list]], *, mode: str | None = None,
               timeout_s: float | None = None, on_progress: Callable[[int], None] | None = None):
        if mode not in (None, "auto", "lora"):
            raise UserError(f"mode {mode!r} is not available with endpoints (servers use multi-LoRA)")
        self._connect()
        results: list = [None] * len(jobs)
        done = [0]
        # base-model jobs first, on their own: on a CPU server a base request batched with LoRA requests is
        # computed with the last LoRA slot's adapter (vLLM's CPU kernels index slots with the no-LoRA id -1)
        for phase in ([j for j, job in enumerate(jobs) if job[0] is None],
                      [j for j, job in enumerate(jobs) if job[0] is not None]):
            if phase:
                self._run_phase(jobs, phase, results, done, timeout_s, on_progress)
        return results, {"jobs_per_endpoint": [e.jobs_done for e in self.endpoints]}

    def _run_phase(self, jobs, indices, results, done, timeout_s, on_progress) -> None:
        """Hand each job to the least busy endpoint (at most `per_endpoint` in flight on each); first error wins."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        eps = self.endpoints
        inflight = [0] * len(eps)
        errors: list[BaseException] = []
        cond = threading.Condition()

        def run(i: int, j: int, adapter, reqs) -> None:
            try:
                results[j] = self._job(eps[i], adapter, reqs)
                ok = True
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                errors.append(e)
                ok = False
            with cond:
                inflight[i] -= 1
                if ok:
                    eps[i].jobs_done += 1
                    done[0] += 1
                    if on_progress:
                        on_progress(done[0])
                cond.notify_all()

        def wait_until(pred) -> None:
            while not pred() and not errors:
                if deadline is not None and time.monotonic() > deadline:
                    errors.append(EvaluatorCrashed(f"endpoints did not finish scoring within {timeout_s:.0f}s"))
                    return
                cond.wait(timeout=1.0)

        threads = []
        for j in indices:
            adapter, _key, reqs = jobs[j]
            with cond:
                wait_until(lambda: min(inflight) < self.per_endpoint)
                if errors:
                    break
                i = min(range(len(eps)), key=lambda k: (inflight[k], eps[k].jobs_done))
                inflight[i] += 1
            t = threading.Thread(target=run, args=(i, j, adapter, reqs), daemon=True)
            t.start()
            threads.append(t)
        with cond:
            wait_until(lambda: sum(inflight) == 0)
        if errors:
            raise errors[0]

    def close(self) -> None:
        pass  # the servers belong to the user
