"""The evaluator facade (Contract 3): score individuals (PEFT folders, None = base model) on tasks.

    ev = make_evaluator(model_path)                       # managed vLLM worker (default) or endpoints=[...]
    results = ev.evaluate(["/dev/shm/pop/ind0", None], [get_task("mmlu", formatter=model_path)], "dev", 200)
    results[0].scores -> {"mmlu": 0.31};  results[0].tasks["mmlu"].predictions / option_probs (for the ensemble)
    ev.close()

Each call: validate adapters (rank <= max_lora_rank), hash them, serve what the cache holds, send the rest to the
backend as one job per distinct individual (all its tasks' requests together, so the weight-swap path swaps once per
individual and the LoRA path keeps everything in flight), cache the answers, let each task score its responses.
Never imports JAX.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import tempfile
import time
from typing import Sequence

from evaluators.backends.cache import ResultCache, cache_key, requests_digest
from evaluators.backends.peft_folder import adapter_info, check_rank, content_hash
from evaluators.errors import UserError

BASE_KEY = "base"


@dataclasses.dataclass(frozen=True)
class IndividualResult:
    """One individual's results. tasks: {task name: TaskResult} (score, predictions, option_probs, ...)."""

    adapter: str | None
    key: str  # content hash of the adapter folder ("base" for the base model)
    tasks: dict
    cached: bool  # every task came from the cache

    @property
    def scores(self) -> dict[str, float]:
        return {name: r.score for name, r in self.tasks.items()}

    def fitness(self, weights: Sequence[float] | None = None) -> float:
        from evaluators.tasks.metrics import weighted_fitness

        return weighted_fitness(self.tasks, weights)

    def to_json(self) -> dict:
        return {"adapter": self.adapter, "key": self.key, "cached": self.cached,
                "tasks": {k: v.to_json() for k, v in self.tasks.items()}}


def scratch_dir(prefix: str = "genome-adapters-") -> str:
    """A fresh folder `<prefix><pid>-*` for exported adapters, in tmpfs (/dev/shm) where it exists and is writable.
    Folders of the same prefix left by a process that died (a SIGKILLed run) are removed first."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    remove_dead_pid_dirs(base or tempfile.gettempdir(), prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)


def remove_dead_pid_dirs(parent: str, prefix: str) -> None:
    """Remove the folders `parent/<prefix><pid>-*` whose process no longer exists."""
    for d in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*-*")):
        pid = os.path.basename(d)[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Evaluator:
    """Facade over one backend (ManagedBackend or EndpointsBackend) with the result cache in front of it."""

    def __init__(self, backend, *, model: str, max_lora_rank: int = 16, cache: ResultCache | None = None,
                 progress: bool = False):
        self.backend = backend
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.cache = cache if cache is not None else ResultCache()
        self.progress = progress
        self.backend_calls = 0  # how many times the backend was asked to score (0 new jobs: not asked)
        self.last_timing: dict = {}

    def check_adapters(self, adapters: Sequence[str | None]) -> list[str]:
        """Validate every adapter before any work starts; returns content keys ("base" for None)."""
        keys = []
        for a in adapters:
            if a is None:
                keys.append(BASE_KEY)
                continue
            check_rank(adapter_info(a), self.max_lora_rank)
            keys.append(content_hash(a))
        return keys

    def numerics(self, mode: str | None = None) -> str:
        """"route:dtype" of the engine that answers a call with this `mode` (part of the result-cache key), e.g.
        "swap:bfloat16" or "lora:float32"; read from the started engine (started here if needed: "auto" is
        resolved by the engine's platform). External endpoints: "endpoints:server" (their dtype is theirs)."""
        b = self.backend
        if getattr(b, "kind", None) == "endpoints" or not hasattr(b, "start"):
            return f"{getattr(b, 'kind', type(b).__name__)}:server"
        info = getattr(b, "info", None) or b.start()
        if isinstance(info, list):  # pools and Ray: every engine is started with the same config
            info = info[0] if info else {}
        return f"{mode or info.get('mode', 'auto')}:{info.get('dtype', '?')}"

    def evaluate(self, adapters: Sequence[str | None], tasks: Sequence, split: str, n: int | None = None, *,
                 mode: str | None = None, timeout_s: float | None = None) -> list[IndividualResult]:
        """Score each adapter (None = base model) on each task's first n items of `split`."""
        t0 = time.perf_counter()
        adapters = [None if a is None else os.fspath(a) for a in adapters]
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
        todo: dict[str, tuple[str | None, list[int]]] = {}  # key -> (adapter, indices of prepared tasks)
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
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=len(jobs), desc="scoring individuals", unit="ind", leave=False)
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
        from evaluators.backends.endpoints import EndpointsBackend

        backend = EndpointsBackend(list(endpoints), model=model, **backend_kwargs)
    elif ray_address is not None:
        from evaluators.backends.ray_backend import RayBackend

        model = os.path.expanduser(model)
        if ray_address == "local" and not os.path.isdir(model):
            raise UserError(f"model_path {model}: not a folder (a local Hugging Face checkpoint is needed)")
        backend = RayBackend(model, address=None if ray_address == "local" else ray_address, num_actors=ray_actors,
                             mode=eval_mode, max_lora_rank=max_lora_rank, max_loras=max_loras, **backend_kwargs)
    elif eval_devices is not None and len(_devices(eval_devices)) > 1:
        from evaluators.backends.device_pool import DevicePoolBackend

        model = os.path.expanduser(model)
        if not os.path.isdir(model):
            raise UserError(f"model_path {model}: not a folder (a local Hugging Face checkpoint is needed)")
        backend = DevicePoolBackend(model, _devices(eval_devices), mode=eval_mode, max_lora_rank=max_lora_rank,
                                    max_loras=max_loras, **backend_kwargs)
    else:
        if eval_devices is not None:  # one device: a plain managed worker pinned to it
            env = dict(backend_kwargs.pop("env", None) or {}, CUDA_VISIBLE_DEVICES=_devices(eval_devices)[0])
            backend_kwargs["env"] = env
        from evaluators.backends.managed import ManagedBackend

        model = os.path.expanduser(model)
        if not os.path.isdir(model):
            raise UserError(f"model_path {model}: not a folder (a local Hugging Face checkpoint is needed)")
        backend = ManagedBackend(model, mode=eval_mode, max_lora_rank=max_lora_rank, max_loras=max_loras,
                                 **backend_kwargs)
    return Evaluator(backend, model=model, max_lora_rank=max_lora_rank, cache=ResultCache(cache_dir),
                     progress=progress)


def _devices(eval_devices) -> list[str]:
    from evaluators.backends.device_pool import parse_devices

    return parse_devices(eval_devices)
