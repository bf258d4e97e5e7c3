"""One managed vLLM worker per device on this machine (`--eval_devices 0,1,2,3`), individuals balanced over them.

Each member is an ordinary `ManagedBackend` (its own `python -m evaluators.backends.worker` process) started with
CUDA_VISIBLE_DEVICES set to its device, so every engine sees exactly one GPU as cuda:0. A shared queue hands out
chunks of individuals: a member asks for the next chunk when it returns one, so the work balances itself. A member
whose worker crashes is restarted by ManagedBackend on its next call; the chunk it held goes back to the queue
and is scored again (by whichever member is free), at most `retries + 1` times before the call fails.

On a CPU-only machine the variable is harmless, so the pool also runs (as N CPU engines) for tests and benchmarks.
Never imports JAX or vLLM.
"""
from __future__ import annotations

import collections
import math
import os
import re
import tempfile
import threading
import time
from typing import Callable, Sequence

from evaluators.backends.managed import ManagedBackend, engine_numerics
from evaluators.errors import EvaluatorCrashed, UserError

_DEVICE = re.compile(r"^(\d+|GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Za-z/-]+)$")


def parse_devices(devices: str | Sequence[str | int]) -> list[str]:
    """'0,1,2,3' or [0, 1, 2, 3] -> ['0', '1', '2', '3'] (indices or GPU/MIG UUIDs), validated."""
    items = devices.split(",") if isinstance(devices, str) else [str(d) for d in devices]
    items = [d.strip() for d in items]
    if not items or any(not d for d in items):
        raise UserError(f"eval_devices {devices!r}: expected a comma-separated list such as 0,1,2,3")
    bad = [d for d in items if not _DEVICE.match(d)]
    if bad:
        raise UserError(f"eval_devices: {bad[0]!r} is not a device index or GPU UUID")
    dup = sorted({d for d in items if items.count(d) > 1})
    if dup:
        raise UserError(f"eval_devices: device {dup[0]} is listed twice (one engine per device)")
    return items


class DevicePoolBackend:
    """N ManagedBackends, one per device; `answer(jobs)` has ManagedBackend's contract."""

    kind = "managed-pool"

    def __init__(self, model: str, devices: str | Sequence[str | int], *, chunk: int | None = None,
                 retries: int = 1, log_dir: str | None = None, env: dict | None = None, **managed_kwargs):
        self.devices = parse_devices(devices)
        self.model = model
        self.chunk = chunk
        self.retries = retries
        log_dir = log_dir or tempfile.gettempdir()
        self.members = [
            ManagedBackend(model, env={**(env or {}), "CUDA_VISIBLE_DEVICES": d},
                           log_path=os.path.join(log_dir, f"genome-eval-worker-{os.getpid()}-dev{d.replace('/', '_')}.log"),
                           **managed_kwargs)
            for d in self.devices
        ]
        self.max_lora_rank = self.members[0].max_lora_rank
        self.info: list[dict] | None = None
        self.busy: set[int] = set()  # members scoring a chunk right now (during `answer`)

    def start(self) -> list[dict]:
        """Start every member's worker in parallel; returns their engine infos (device order)."""
        if self.info is not None and all(m.proc is not None and m.proc.poll() is None for m in self.members):
            return self.info
        infos: list = [None] * len(self.members)
        errors: list[BaseException] = []

        def go(i, m):
            try:
                infos[i] = m.start()
            except BaseException as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
                errors.append(e)

        threads = [threading.Thread(target=go, args=(i, m), daemon=True) for i, m in enumerate(self.members)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]
        self.info = [dict(info, device=d) for info, d in zip(infos, self.devices)]
        return self.info

    def numerics(self, mode: str | None = None) -> str:
        return engine_numerics(self.start(), mode)

    def _chunk(self, n_jobs: int) -> int:
        if self.chunk:
            return self.chunk
        # about two chunks per member: big enough for multi-LoRA batching, small enough to balance
        return max(1, math.ceil(n_jobs / (2 * len(self.members))))

    def answer(self, jobs: list[tuple[str | None, str | None, list]], *, mode: str | None = None,
               timeout_s: float | None = None, on_progress: Callable[[int], None] | None = None):
        """jobs: [(adapter path or None, content key or None, [Request, ...]), ...] -> ([[Response, ...]], timing)."""
        self.start()
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        size = self._chunk(len(jobs))
        work = collections.deque((start, min(start + size, len(jobs)), 0) for start in range(0, len(jobs), size))
        results: list = [None] * len(jobs)
        timing = {"swap_s": 0.0, "generate_s": 0.0, "lora_load_s": 0.0}
        per_member = [0] * len(self.members)
        lock = threading.Lock()
        done = [0]
        failure: list[BaseException] = []
        restarts = [0]
        active = set(range(len(self.members)))

        def member_loop(k: int, m: ManagedBackend) -> None:
            while True:
                with lock:
                    if failure or not work:
                        active.discard(k)
                        return
                    start, stop, attempt = work.popleft()
                    self.busy.add(k)
                left = None if t_end is None else max(t_end - time.monotonic(), 0.01)
                try:
                    res, t = m.answer(jobs[start:stop], mode=mode, timeout_s=left)
                except EvaluatorCrashed as e:
                    with lock:
                        self.busy.discard(k)
                        restarts[0] += 1
                        if attempt >= self.retries:
                            failure.append(e)
                            active.discard(k)
                            return
                        work.appendleft((start, stop, attempt + 1))  # scored again by whichever member is free
                        if len(active) > 1:  # the others carry on; this worker restarts on the next call
                            active.discard(k)
                            return
                    continue  # the last member standing restarts its worker now
                except BaseException as e:  # noqa: BLE001 (UserError and the like: the call fails)
                    with lock:
                        self.busy.discard(k)
                        failure.append(e)
                        active.discard(k)
                    return
                with lock:
                    self.busy.discard(k)
                    results[start:stop] = res
                    for key in timing:
                        timing[key] += float(t.get(key, 0.0))
                    per_member[k] += stop - start
                    done[0] += stop - start
                    if on_progress is not None:  # under the lock: counts arrive in order
                        on_progress(done[0])

        threads = [threading.Thread(target=member_loop, args=(k, m), daemon=True) for k, m in enumerate(self.members)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failure:
            raise failure[0]
        if any(r is None for r in results):  # every member died on its last chunk
            raise EvaluatorCrashed("every evaluator worker of the device pool failed; see the logs in "
                                   f"{os.path.dirname(self.members[0].log_path)}")
        timing.update(engines=len(self.members), jobs_per_engine=per_member, restarts=restarts[0])
        return results, timing

    def ping(self) -> list[dict]:
        return [m.ping() for m in self.members]

    def close(self) -> None:
        for m in self.members:
            m.close()
        self.info = None
