"""The Ray backend: many vLLM engines, one per Ray actor, on one machine or a whole Ray cluster.

Each actor hosts the managed worker's own `Engine` (evaluators.backends.worker: same weight-swap and LoRA paths,
same answers), so nothing about scoring is re-implemented here. What this module adds is the fan-out:

- Adapters travel as Ray objects: the bytes of the PEFT folder's files, put once into the object store per call
  and materialised by the actor in its own scratch folder (tmpfs), so actors need no shared file system.
- Balance: one work queue of individuals; an actor gets its next individual when it returns one, so fast actors
  (or light individuals) take more. Results come back in job order whatever the schedule.
- Faults: an actor that dies (process killed, node lost) is replaced by a fresh one, started in the background
  while the survivors keep working, and the individual it held is scored again. Scoring is deterministic (greedy,
  fixed seed, same engine config everywhere), so the answers are the same as without the fault.

    backend = RayBackend(model_dir, num_actors=2)          # local Ray, or address="ray://head:10001"
    results, timing = backend.answer([(adapter_dir, key, requests), ...])
    backend.close()                                        # kills the actors (and the local Ray it started)

Requires `pip install ray` (the `ray` extra). The model folder must exist at the same path on every node. Never
imports JAX; the driver never imports vLLM (only the actors do).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import evaluators
from evaluators.backends.managed import engine_numerics
from evaluators.backends.worker import Engine
from evaluators.errors import EvaluatorCrashed, UserError
from evaluators.protocol import from_json, to_json

# Environment of every engine actor (the managed worker's defaults; see managed.worker_env).
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core inside the actor: killing the actor frees everything
    "VLLM_LOGGING_LEVEL": "WARNING",
}
_PASS_THROUGH = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND", "HF_HOME",
                 "HF_HUB_OFFLINE", "VLLM_LOGGING_LEVEL", "VLLM_USE_V1")


def _ray():
    try:
        import ray  # optional extra (genome-jax[ray]), heavy: only the Ray backend needs it
    except ImportError:
        raise UserError("the Ray backend needs Ray: pip install 'genome-jax[ray]' (or pip install ray)") from None
    return ray


# ---- adapters as bytes ------------------------------------------------------------------------------------------

def pack_adapter(path: str) -> dict[str, bytes]:
    """The files of a PEFT folder, {file name: bytes} (a PEFT folder is flat; subfolders are refused)."""
    if not os.path.isdir(path):
        raise UserError(f"adapter folder not found: {path}")
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isdir(full):
            raise UserError(f"{path}: unexpected subfolder {name!r} in a PEFT adapter folder")
        with open(full, "rb") as f:
            out[name] = f.read()
    return out


def unpack_adapter(packed: dict[str, bytes], root: str, key: str) -> str:
    """Write a packed adapter to root/key (temp folder + rename: never half-written); returns the folder."""
    dest = os.path.join(root, key)
    if os.path.isdir(dest):
        return dest
    tmp = tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=root)
    for name, data in packed.items():
        if os.sep in name or name in ("", ".", ".."):
            raise UserError(f"packed adapter {key[:12]}: bad file name {name!r}")
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    try:
        os.rename(tmp, dest)
    except OSError:  # another call materialised it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def packed_key(packed: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(packed):
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(packed[name]).digest())
    return h.hexdigest()


# ---- the actor ----------------------------------------------------------------------------------------------------

_SCRATCH = "genome-ray-adapters-"


def _scratch_base() -> str:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def _remove_orphans(base: str) -> None:
    """Delete scratch folders of actors that died on this node (a killed actor cannot clean up after itself)."""
    for name in os.listdir(base):
        if not name.startswith(_SCRATCH):
            continue
        try:
            pid = int(name[len(_SCRATCH):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except (ValueError, PermissionError):
            continue


class EngineHost:
    """Body of a Ray actor: one `worker.Engine` and a scratch folder for the adapters it is sent."""

    def __init__(self, cfg: dict, env: dict):
        os.environ.update(env)  # also set via runtime_env; here for actors started without one (before vLLM loads)
        base = _scratch_base()
        _remove_orphans(base)
        self.root = tempfile.mkdtemp(prefix=f"{_SCRATCH}{os.getpid()}-", dir=base)
        self.engine = Engine(cfg)

    def info(self) -> dict:
        return dict(self.engine.info(), host=socket.gethostname())

    def score(self, key: str | None, packed: dict[str, bytes] | None, requests: list[dict], mode: str | None):
        """Answer one individual's requests (JSON dicts). Returns ([response JSON, ...], timing)."""
        path = None if packed is None else unpack_adapter(packed, self.root, packed_key(packed))
        try:
            job = {"adapter": path, "key": key, "requests": requests}
            results, timing = self.engine.score([job], mode, lambda j: None)
        finally:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        return [to_json(r) for r in results[0]], timing

    def cleanup(self) -> None:
        """Remove this actor's scratch folder (called before the actor is killed on close)."""
        shutil.rmtree(self.root, ignore_errors=True)


class _Slot:
    """One engine position in the pool: the current actor handle and its bookkeeping."""

    def __init__(self, index: int):
        self.index = index
        self.actor = None
        self.generation = 0  # bumps each time the actor is replaced
        self.jobs_done = 0


class RayBackend:
    """N Ray actors, each with one vLLM engine; `answer(jobs)` balances individuals over them (see module doc)."""

    kind = "ray"

    def __init__(
        self,
        model: str,
        *,
        num_actors: int | None = None,
        address: str | None = None,
        num_cpus_per_actor: float = 1,
        num_gpus_per_actor: float | None = None,
        mode: str = "auto",
        dtype: str | None = None,
        max_lora_rank: int = 16,
        max_loras: int = 8,
        enable_lora: bool = False,
        seed: int = 0,
        prefix_caching: bool = True,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        gpu_memory_utilization: float | None = None,
        startup_timeout_s: float = 900.0,
        max_replacements: int = 4,
        env: dict | None = None,
        ray_init_kwargs: dict | None = None,
        ship_code: bool | None = None,
    ):
        if mode not in ("auto", "swap", "lora"):
            raise UserError(f"mode must be auto, swap or lora, not {mode!r}")
        if num_actors is not None and num_actors < 1:
            raise UserError(f"num_actors must be >= 1, not {num_actors}")
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.cfg = dict(model=model, mode=mode, dtype=dtype, max_lora_rank=max_lora_rank, max_loras=max_loras,
                        enable_lora=enable_lora, seed=seed, prefix_caching=prefix_caching,
                        max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                        gpu_memory_utilization=gpu_memory_utilization)
        self.num_actors = num_actors
        self.address = address
        self.num_cpus_per_actor = num_cpus_per_actor
        self.num_gpus_per_actor = num_gpus_per_actor
        self.startup_timeout_s = startup_timeout_s
        self.max_replacements = max_replacements
        self.env = dict(ENGINE_ENV)
        self.env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
        self.env.update(env or {})
        self.ray_init_kwargs = dict(ray_init_kwargs or {})
        self.ship_code = ship_code
        self.slots: list[_Slot] = []
        self._starting: dict[Any, _Slot] = {}
        self.busy: set[int] = set()  # slots holding an individual right now (during `answer`)
        self.replaced = 0  # actors replaced after a loss, over the backend's life
        self.info: list[dict] | None = None
        self._owns_ray = False
        self._actor_cls = None

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def _connect(self):
        ray = _ray()
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            kwargs.update(self.ray_init_kwargs)
            if self.address:
                kwargs["address"] = self.address
            ship = self.ship_code if self.ship_code is not None else bool(self.address)
            if ship:  # a remote cluster's nodes may not have this package: send it with the job
                runtime_env = dict(kwargs.get("runtime_env") or {})
                runtime_env.setdefault("py_modules", [os.path.dirname(evaluators.__file__)])
                kwargs["runtime_env"] = runtime_env
            ray.init(**kwargs)
            self._owns_ray = True
        return ray

    def _resources(self, ray) -> tuple[int, float]:
        """(number of actors, GPUs per actor): one engine per GPU when the cluster has GPUs, else per CPU slot."""
        total = ray.cluster_resources()
        gpus = self.num_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
        n = self.num_actors
        if n is None:
            n = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 1) // max(self.num_cpus_per_actor, 1e-9))
            n = max(n, 1)
        return n, gpus

    def _new_actor(self, ray, slot: _Slot):
        if self._actor_cls is None:
            self._actor_cls = ray.remote(EngineHost)
        slot.generation += 1
        slot.actor = self._actor_cls.options(
            num_cpus=self.num_cpus_per_actor,
            num_gpus=self._gpus,
            max_restarts=0,  # replacement is ours: we must know which individual to score again
            name=None,
            runtime_env={"env_vars": dict(self.env)},
        ).remote(self.cfg, self.env)
        return slot.actor.info.remote()

    def start(self) -> list[dict]:
        """Start every actor (in parallel) and wait for their engines; returns each engine's info."""
        if self.slots:
            return self.info
        ray = self._connect()
        n, self._gpus = self._resources(ray)
        self.slots = [_Slot(i) for i in range(n)]
        ready = [self._new_actor(ray, s) for s in self.slots]
        try:
            self.info = self._get(ray, ready, self.startup_timeout_s, "starting")
        except BaseException:
            self.close()
            raise
        return self.info

    def numerics(self, mode: str | None = None) -> str:
        return engine_numerics(self.start(), mode)

    def _get(self, ray, refs, timeout_s, doing):
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise EvaluatorCrashed(f"Ray engine actors did not finish {doing} within {timeout_s:.0f}s "
                                   f"(cluster resources: {ray.cluster_resources()})") from None
        except ray.exceptions.RayActorError as e:
            raise EvaluatorCrashed(f"a Ray engine actor died while {doing}: {_first_line(e)}") from None
        except ray.exceptions.RayError as e:  # task errors, OutOfMemoryError (Ray's memory monitor), ...
            raise EvaluatorCrashed(f"a Ray engine actor failed while {doing}: {_first_line(e)}") from None

    def close(self) -> None:
        """Kill every actor; shut down the local Ray instance if this backend started it."""
        try:
            ray = _ray()
        except UserError:
            return
        live = [s.actor for s in self.slots if s.actor is not None]
        if live and ray.is_initialized():
            try:  # let each engine remove its scratch folder; a dead or busy one is cleaned by the next start
                ray.wait([a.cleanup.remote() for a in live], num_returns=len(live), timeout=10)
            except Exception:
                pass
            for a in live:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        for s in self.slots:
            s.actor = None
        self.slots = []
        self._starting = {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
            _remove_orphans(_scratch_base())  # actors of a local cluster ran on this machine

    # ---- scoring --------------------------------------------------------------------------------------------------
    def answer(self, jobs: list[tuple[str | None, str | None, list]], *, mode: str | None = None,
               timeout_s: float | None = None, on_progress: Callable[[int], None] | None = None):
        """jobs: [(adapter path or None, content key or None, [Request, ...]), ...] -> ([[Response, ...], ...], timing).

        Same contract as ManagedBackend.answer. A lost actor is replaced (at most `max_replacements` times per
        call) and its individual redone; UserErrors raised by an engine (a bad adapter) propagate as UserError.
        """
        self.start()
        ray = _ray()
        t0 = time.perf_counter()
        t_end = None if timeout_s is None else time.monotonic() + timeout_s

        # Ship each distinct adapter and each distinct request list once (the object store dedups nothing itself).
        adapter_refs: dict[str, Any] = {}
        request_refs: dict[str, Any] = {}
        tasks = []  # per job: (key, adapter ref or None, requests ref)
        for adapter, key, reqs in jobs:
            aref = None
            if adapter is not None:
                aref = adapter_refs.get(adapter)
                if aref is None:
                    aref = adapter_refs[adapter] = ray.put(pack_adapter(adapter))
            payload = [to_json(r) for r in reqs]
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            rref = request_refs.get(digest)
            if rref is None:
                rref = request_refs[digest] = ray.put(payload)
            tasks.append((key, aref, rref))
        t_ship = time.perf_counter() - t0

        pending = collections.deque(range(len(jobs)))
        starting = self._starting  # replacement actors whose engine is still loading (kept across calls)
        idle: list[_Slot] = [s for s in self.slots if s not in starting.values()]
        in_flight: dict[Any, tuple[int, _Slot]] = {}
        results: list[Any] = [None] * len(jobs)
        timing = {"swap_s": 0.0, "generate_s": 0.0, "lora_load_s": 0.0}
        per_actor = collections.Counter()
        replaced_now = 0
        done = 0

        def replace(slot: _Slot, why: str) -> None:
            nonlocal replaced_now
            replaced_now += 1
            self.replaced += 1
            if replaced_now > self.max_replacements:
                raise EvaluatorCrashed(f"Ray engine actors died {replaced_now} times in one call (last: {why}); "
                                       f"giving up after {self.max_replacements} replacements")
            sys.stderr.write(f"genome: Ray engine actor {slot.index} lost ({why}); starting a replacement\n")
            try:
                ray.kill(slot.actor)
            except Exception:
                pass
            starting[self._new_actor(ray, slot)] = slot

        try:
            while pending or in_flight:
                while pending and idle:
                    i = pending.popleft()
                    slot = idle.pop(0)
                    key, aref, rref = tasks[i]
                    in_flight[slot.actor.score.remote(key, aref, rref, mode)] = (i, slot)
                    self.busy.add(slot.index)
                if not in_flight and not starting:
                    raise EvaluatorCrashed("no Ray engine actor is left to score on")
                wait_s = None if t_end is None else max(t_end - time.monotonic(), 0.0)
                ready, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=wait_s)
                if not ready:
                    raise EvaluatorCrashed(f"Ray scoring did not finish within {timeout_s:.0f}s "
                                           f"({done}/{len(jobs)} individuals done)")
                ref = ready[0]
                if ref in starting:
                    slot = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        replace(slot, f"replacement failed to start: {_first_line(e)}")
                        continue
                    idle.append(slot)
                    continue
                i, slot = in_flight.pop(ref)
                self.busy.discard(slot.index)
                try:
                    responses, t = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as e:
                    pending.appendleft(i)  # redo this individual first
                    replace(slot, _first_line(e))
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, UserError):
                        raise UserError(str(cause)) from None
                    raise RuntimeError(f"Ray engine actor {slot.index} failed: {_first_line(e)}") from None
                results[i] = [from_json(r) for r in responses]
                for k in timing:
                    timing[k] += float(t.get(k, 0.0))
                per_actor[slot.index] += 1
                slot.jobs_done += 1
                idle.append(slot)
                done += 1
                if on_progress is not None:
                    on_progress(done)
        except BaseException:
            for ref in in_flight:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            raise
        finally:
            self.busy.clear()
            del adapter_refs, request_refs  # release the object-store copies
        # a replacement still loading when the work ran out joins the pool in the next call
        timing.update(ship_s=t_ship, actors=len(self.slots), replaced=replaced_now,
                      jobs_per_actor=[per_actor[s.index] for s in self.slots])
        return results, timing

    def ping(self) -> list[dict]:
        ray = _ray()
        self.start()
        return self._get(ray, [s.actor.info.remote() for s in self.slots], 60.0, "answering a ping")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"
