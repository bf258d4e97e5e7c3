"""The evaluator facade (Contract 3): score individuals (PEFT folders, in-memory adapter handles, None = base model)
on tasks, through any `ScoringBackend` (evaluators/protocol.py).

    ev = make_evaluator(model_path)                       # managed vLLM worker (default) or endpoints=[...]
    results = ev.evaluate(["/dev/shm/pop/ind0", None], [get_task("mmlu", formatter=model_path)], "dev", 200)
    results[0].scores -> {"mmlu": 0.31};  results[0].tasks["mmlu"].predictions / option_probs (for the ensemble)
    ev.close()

`Evaluator(backend, model=...)` wraps any other backend, e.g. the in-process JAX scorer (scripts/scoring.py wires it).
Each call: validate adapters (PEFT folders: rank <= max_lora_rank), key them (folder content hash, or the handle's
`key`), serve what the cache holds, send the rest to the backend as one job per distinct individual (all its tasks'
requests together, so the weight-swap path swaps once per individual, the LoRA path keeps everything in flight and
the JAX scorer stacks individuals into one batched pass), cache the answers, let each task score its responses.
This is the only task -> requests -> score loop. Never imports JAX.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from tqdm import tqdm

from evaluators.backends.cache import ResultCache, cache_key, requests_digest
from evaluators.backends.device_pool import DevicePoolBackend, parse_devices
from evaluators.backends.endpoints import EndpointsBackend
from evaluators.backends.managed import ManagedBackend
from evaluators.backends.peft_folder import adapter_info, check_rank, content_hash
from evaluators.backends.ray_backend import RayBackend
from evaluators.errors import UserError
from evaluators.protocol import ScoringBackend
from evaluators.tasks.metrics import weighted_fitness

BASE_KEY = "base"


@dataclasses.dataclass(frozen=True)
class IndividualResult:
    """One individual's results. tasks: {task name: TaskResult} (score, predictions, option_probs, ...)."""

    adapter: Any  # the folder path, the adapter handle, or None (base model), as given to `evaluate`
    key: str  # content hash of the adapter folder, the handle's key, or "base" for the base model
    tasks: dict
    cached: bool  # every task came from the cache

    @property
    def scores(self) -> dict[str, float]:
        return {name: r.score for name, r in self.tasks.items()}

    def fitness(self, weights: Sequence[float] | None = None) -> float:
        return weighted_fitness(self.tasks, weights)

    def to_json(self) -> dict:
        adapter = self.adapter if self.adapter is None or isinstance(self.adapter, str) else self.key
        return {"adapter": adapter, "key": self.key, "cached": self.cached,
                "tasks": {k: v.to_json() for k, v in self.tasks.items()}}


class Evaluator:
    """The result cache and the task loop in front of one `ScoringBackend`."""

    def __init__(self, backend: ScoringBackend, *, model: str, max_lora_rank: int | None = 16,
                 cache: ResultCache | None = None, progress: bool = False):
        """max_lora_rank: PEFT folders above this rank are refused before any work (None: no limit, e.g. JAX)."""
        self.backend = backend
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.cache = cache if cache is not None else ResultCache()
        self.progress = progress
        self.backend_calls = 0  # how many times the backend was asked to score (0 new jobs: not asked)
        self.last_timing: dict = {}

    def check_adapters(self, adapters: Sequence[Any]) -> list[str]:
        """Validate every adapter before any work starts; returns content keys ("base" for None)."""
        return [adapter_key(a, self.max_lora_rank) for a in adapters]

    def numerics(self, mode: str | None = None) -> str:
        """"route:dtype" of the engine that answers a call with this `mode` (part of the result-cache key), e.g.
        "swap:bfloat16", "lora:float32", "jax:float32", "endpoints:server" (see ScoringBackend.numerics)."""
        return self.backend.numerics(mode)

    def evaluate(self, adapters: Sequence[Any], tasks: Sequence, split: str, n: int | None = None, *,
                 mode: str | None = None, timeout_s: float | None = None,
                 desc: str = "scoring individuals") -> list[IndividualResult]:
        """Score each adapter (a PEFT folder, an adapter handle with a `key`, or None = base model) on each task's
        first n items of `split`. desc: the progress bar's label (with progress=True)."""
        t0 = time.perf_counter()
        adapters = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in adapters]
        keys = self.check_adapters(adapters)
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise UserError(f"task listed twice: {names}")
        prepared = []  # (task, items, requests, requests digest)
        for t in tasks:
            items = t.load(split, n)
            reqs = t.build_requests(items, t.mode)
            prepared.append((t, items, reqs, requests_digest(reqs)))

        # what is cached, what must be scored (each distinct individual once)
        num = self.numerics(mode)
        responses: dict[tuple[str, str], list] = {}
        todo: dict[str, tuple[Any, list[int]]] = {}  # key -> (adapter, indices of prepared tasks)
        for a, k in zip(adapters, keys):
            for ti, (t, _, reqs, dig) in enumerate(prepared):
                ck = cache_key(self.model, k, t.name, split, n, t.mode, dig, num)
                hit = self.cache.get(ck)
                if hit is not None:
                    responses[(k, t.name)] = hit
                elif (k, t.name) not in responses:
                    ent = todo.setdefault(k, (a, []))
                    if ti not in ent[1]:
                        ent[1].append(ti)
        fresh = set()
        if todo:
            jobs, spans = [], []
            for k, (a, tis) in todo.items():
                reqs, span = [], []
                for ti in tis:
                    span.append((ti, len(reqs), len(prepared[ti][2])))
                    reqs += prepared[ti][2]
                jobs.append((a, None if k == BASE_KEY else k, reqs))
                spans.append((k, span))
            bar = tqdm(total=len(jobs), desc=desc, unit="ind", leave=False) if self.progress else None
            try:
                results, timing = self.backend.answer(
                    jobs, mode=mode, timeout_s=timeout_s,
                    on_progress=(lambda j: bar.update(j - bar.n)) if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            self.backend_calls += 1
            for (k, span), res in zip(spans, results):
                for ti, start, cnt in span:
                    t, _, _, dig = prepared[ti]
                    rs = res[start:start + cnt]
                    responses[(k, t.name)] = rs
                    self.cache.put(cache_key(self.model, k, t.name, split, n, t.mode, dig, num), rs)
                    fresh.add(k)
            self.last_timing = dict(timing, jobs=len(jobs))
        else:
            self.last_timing = {"jobs": 0}

        out = []
        for a, k in zip(adapters, keys):
            per_task = {t.name: t.score(items, responses[(k, t.name)], t.mode) for t, items, _, _ in prepared}
            out.append(IndividualResult(adapter=a, key=k, tasks=per_task, cached=k not in fresh))
        self.last_timing["wall_s"] = time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def adapter_key(adapter: Any, max_lora_rank: int | None) -> str:
    """Content key of one adapter: "base" for None, the content hash of a PEFT folder (validated, rank checked
    against max_lora_rank unless None), or an adapter handle's own `key`."""
    if adapter is None:
        return BASE_KEY
    if isinstance(adapter, str):
        info = adapter_info(adapter)
        if max_lora_rank is not None:
            check_rank(info, max_lora_rank)
        return content_hash(adapter)
    key = getattr(adapter, "key", None)
    if not isinstance(key, str) or not key or key == BASE_KEY:
        raise UserError(f"adapters: {type(adapter).__name__} is neither a PEFT folder path, None (the base model) "
                        "nor an adapter handle with a content `key`")
    return key


def make_evaluator(model: str, *, endpoints: Sequence[str] | None = None, eval_mode: str = "auto",
                   max_lora_rank: int = 16, max_loras: int = 8, cache_dir: str | None = None,
                   progress: bool = False, eval_devices: str | Sequence[str | int] | None = None,
                   ray_address: str | None = None, ray_actors: int | None = None, **backend_kwargs) -> Evaluator:
    """The default evaluator: a managed local vLLM worker; with `endpoints`, external OpenAI-compatible servers.

    eval_devices ("0,1,2,3"): one managed worker per GPU (CUDA_VISIBLE_DEVICES each), individuals balanced over them.
    ray_address ("local", "auto" or "ray://head:10001"): one vLLM engine per Ray actor on a Ray cluster
    (`ray_actors` of them; default one per GPU of the cluster, or per CPU without GPUs). See docs/SCALING.md.
    """
    if endpoints:
        backend = EndpointsBackend(list(endpoints), model=model, **backend_kwargs)
    elif ray_address is not None:
        model = os.path.expanduser(model)
        if ray_address == "local" and not os.path.isdir(model):
            raise UserError(f"model {model}: not a folder (a local Hugging Face checkpoint is needed)")
        backend = RayBackend(model, address=None if ray_address == "local" else ray_address, num_actors=ray_actors,
                             mode=eval_mode, max_lora_rank=max_lora_rank, max_loras=max_loras, **backend_kwargs)
    elif eval_devices is not None and len(parse_devices(eval_devices)) > 1:
        model = os.path.expanduser(model)
        if not os.path.isdir(model):
            raise UserError(f"model {model}: not a folder (a local Hugging Face checkpoint is needed)")
        backend = DevicePoolBackend(model, parse_devices(eval_devices), mode=eval_mode, max_lora_rank=max_lora_rank,
                                    max_loras=max_loras, **backend_kwargs)
    else:
        if eval_devices is not None:  # one device: a plain managed worker pinned to it
            env = dict(backend_kwargs.pop("env", None) or {}, CUDA_VISIBLE_DEVICES=parse_devices(eval_devices)[0])
            backend_kwargs["env"] = env
        model = os.path.expanduser(model)
        if not os.path.isdir(model):
            raise UserError(f"model {model}: not a folder (a local Hugging Face checkpoint is needed)")
        backend = ManagedBackend(model, mode=eval_mode, max_lora_rank=max_lora_rank, max_loras=max_loras,
                                 **backend_kwargs)
    return Evaluator(backend, model=model, max_lora_rank=max_lora_rank, cache=ResultCache(cache_dir),
                     progress=progress)

