"""The managed local backend: spawns `python -m evaluators.backends.worker` and talks JSON lines to it.

Liveness: a reader thread turns the worker's stdout into a queue; EOF (the worker died) is seen at once, a worker
that sends nothing, not even its heartbeat, for `stall_timeout_s` is declared hung, and one that only beats (no
answer, no per-individual progress) for `idle_timeout_s` is declared stuck. Either way the call raises
`EvaluatorCrashed` (with the exit status and the tail of the worker's log), the worker's process group is killed, and
the next call starts a fresh worker: the engine's process survives. With `retries=k` a failed call is retried up to
k times on a fresh worker before it raises (default 0: fail fast, the caller decides).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

from evaluators.backends.scratch import remove_dead_pid_dirs
from evaluators.errors import EvaluatorCrashed, UserError
from evaluators.protocol import from_json, to_json

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EOF = object()


def worker_env(extra: dict | None = None) -> dict:
    """Environment for a vLLM process: CPU KV cache in GiB, offline hubs, our package importable."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # reload_weights carries tensors
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in the worker: one process, no copies
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # each swap would log every untouched layer
    # Safety: the engine's sockets (gloo's process group listens on TCP) stay on the loopback interface, whatever
    # the host name resolves to.
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = _REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def engine_numerics(info: dict | list[dict], mode: str | None) -> str:
    """"route:dtype" from a started engine's info (several engines, a pool or Ray: they share one config)."""
    if isinstance(info, list):
        info = info[0] if info else {}
    return f"{mode or info.get('mode', 'auto')}:{info.get('dtype', '?')}"


class ManagedBackend:
    """One worker process with one vLLM engine. `answer(jobs)` scores each job's requests for its adapter."""

    kind = "managed"

    def __init__(
        self,
        model: str,
        *,
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
        stall_timeout_s: float = 120.0,
        idle_timeout_s: float | None = 3600.0,
        heartbeat_s: float = 2.0,
        retries: int = 0,
        log_path: str | None = None,
        env: dict | None = None,
    ):
        if mode not in ("auto", "swap", "lora"):
            raise UserError(f"mode must be auto, swap or lora, not {mode!r}")
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.cfg = dict(model=model, mode=mode, dtype=dtype, max_lora_rank=max_lora_rank, max_loras=max_loras,
                        enable_lora=enable_lora, seed=seed, prefix_caching=prefix_caching,
                        max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                        gpu_memory_utilization=gpu_memory_utilization, heartbeat_s=heartbeat_s)
        self.startup_timeout_s = startup_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.idle_timeout_s = idle_timeout_s  # heartbeats but no answer/progress this long: the engine is stuck
        self.retries = retries
        self.env = env
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), f"genome-eval-worker-{os.getpid()}.log")
        self.info: dict | None = None
        self.proc: subprocess.Popen | None = None
        self._q: queue.Queue = queue.Queue()
        self._next_id = 0
        self.starts = 0  # how many workers were started (a crash + restart makes it 2)
        self._abandoned = False  # a request was interrupted (graceful stop): close() kills instead of waiting

    # ---- process lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> dict:
        if self.proc is not None and self.proc.poll() is None:
            return self.info
        self._q = queue.Queue()
        log = open(self.log_path, "ab")
        # a private temp folder (vLLM's file store rendezvous lives there), removed with the worker; one left by a
        # SIGKILLed engine is removed by the next start
        remove_dead_pid_dirs(tempfile.gettempdir(), "genome-worker-")
        self._tmp = tempfile.mkdtemp(prefix=f"genome-worker-{os.getpid()}-")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evaluators.backends.worker", json.dumps(self.cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=_REPO_ROOT,
            env=worker_env({"TMPDIR": self._tmp, **(self.env or {})}),
            start_new_session=True,  # own process group: we can kill all of it
        )
        log.close()
        self.starts += 1
        threading.Thread(target=self._read, args=(self.proc.stdout, self._q), daemon=True).start()
        msg = self._wait(lambda m: "ready" in m or "fatal" in m, self.startup_timeout_s, "starting")
        if "fatal" in msg:
            self._kill()
            raise EvaluatorCrashed(f"the evaluator worker could not start: {msg['fatal']} (log: {self.log_path})")
        self.info = msg["ready"]
        return self.info

    @staticmethod
    def _read(stream, q: queue.Queue) -> None:
        for line in stream:
            try:
                q.put(json.loads(line))
            except json.JSONDecodeError:
                continue  # not ours (cannot happen: fd 1 of the worker points at its log)
        q.put(_EOF)

    def _log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 4000))
                lines = f.read().decode(errors="replace").splitlines()[-n:]
            return "\n".join("    " + ln for ln in lines)
        except OSError:
            return ""

    def _wait(self, want: Callable[[dict], bool], timeout_s: float | None, doing: str,
              on_progress: Callable[[dict], None] | None = None) -> dict:
        """Next message satisfying `want`; raises EvaluatorCrashed on EOF, stall or overall timeout."""
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        last_news = time.monotonic()  # last message that was not a heartbeat
        while True:
            wait = self.stall_timeout_s if t_end is None else min(self.stall_timeout_s, t_end - time.monotonic())
            try:
                msg = self._q.get(timeout=max(wait, 0.01))
            except queue.Empty:
                self._kill()
                if t_end is not None and time.monotonic() >= t_end:
                    why = f"did not finish {doing} within {timeout_s:.0f}s"
                else:
                    why = f"sent nothing (not even a heartbeat) for {self.stall_timeout_s:.0f}s while {doing}"
                raise EvaluatorCrashed(f"the evaluator worker {why}; it was killed (log: {self.log_path})")
            if msg is not _EOF and "hb" in msg and self.idle_timeout_s is not None \
                    and time.monotonic() - last_news > self.idle_timeout_s:
                self._kill()  # alive (heartbeats) but stuck inside the engine
                raise EvaluatorCrashed(
                    f"the evaluator worker made no progress for {self.idle_timeout_s:.0f}s while {doing} (heartbeats "
                    f"only: the engine is stuck); it was killed (log: {self.log_path})")
            if msg is _EOF:
                try:
                    rc = self.proc.wait(timeout=30) if self.proc else None
                except subprocess.TimeoutExpired:  # closed its output but lingers: treat as dead
                    rc = None
                self._kill()
                how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with status {rc}"
                raise EvaluatorCrashed(
                    f"the evaluator worker died while {doing} ({how}); log {self.log_path}:\n{self._log_tail()}")
            if "hb" in msg:
                continue
            last_news = time.monotonic()
            if "progress" in msg and on_progress is not None:
                on_progress(msg)
            if want(msg):
                return msg

    def _kill(self, gentle: bool = False) -> None:
        """Kill the worker's whole process group (vLLM may have children) and reap it. A crashed or hung worker
        gets SIGKILL at once (a stopped process never handles SIGTERM); `gentle` tries SIGTERM first."""
        p, self.proc = self.proc, None
        if p is None:
            return
        tmp, self._tmp = getattr(self, "_tmp", None), None
        for sig in ((signal.SIGTERM, signal.SIGKILL) if gentle else (signal.SIGKILL,)):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        for s in (p.stdin, p.stdout):
            try:
                s.close()
            except Exception:
                pass
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        p = self.proc
        # a worker busy with an abandoned request would read `shutdown` only after finishing it: stop it now instead
        if p is not None and p.poll() is None and not self._abandoned:
            try:
                self._send({"op": "shutdown", "id": -1})
                p.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self._kill(gentle=not self._abandoned)  # nothing to save in a worker: no grace needed

    def _send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError, AttributeError):
            pass  # a dead worker is reported by _wait (EOF) with its exit status

    def numerics(self, mode: str | None = None) -> str:
        """"route:dtype" of this engine for a call with `mode`, e.g. "swap:float32" (starts the engine: "auto" is
        resolved by its platform, the dtype by its checkpoint)."""
        return engine_numerics(self.start(), mode)

    # ---- scoring --------------------------------------------------------------------------------------------------
    def answer(self, jobs: list[tuple[str | None, str | None, list]], *, mode: str | None = None,
               timeout_s: float | None = None, on_progress: Callable[[int], None] | None = None):
        """jobs: [(adapter path or None, content key or None, [Request, ...]), ...] -> ([[Response, ...], ...], timing)."""
        attempt = 0
        while True:
            try:
                return self._answer_once(jobs, mode, timeout_s, on_progress)
            except EvaluatorCrashed:
                attempt += 1
                if attempt > self.retries:
                    raise
                sys.stderr.write(f"genome: evaluator worker crashed; restarting (retry {attempt}/{self.retries})\n")
            except BaseException:  # interrupted (a graceful stop): the worker is still busy with an abandoned request
                self._abandoned = True
                raise

    def _answer_once(self, jobs, mode, timeout_s, on_progress):
        self.start()
        self._next_id += 1
        mid = self._next_id
        payload = [{"adapter": a, "key": k, "requests": [to_json(r) for r in reqs]} for a, k, reqs in jobs]
        self._send({"op": "score", "id": mid, "mode": mode, "jobs": payload})
        msg = self._wait(lambda m: m.get("id") == mid and "ok" in m, timeout_s, "scoring",
                         (lambda m: on_progress(m["progress"])) if on_progress else None)
        if not msg["ok"]:
            if msg.get("error_type") == "UserError":
                raise UserError(msg["error"])
            raise RuntimeError(f"evaluator worker error: {msg['error']} (log: {self.log_path})")
        results = [[from_json(r) for r in rs] for rs in msg["results"]]
        return results, msg.get("timing", {})

    def ping(self, timeout_s: float = 30.0) -> dict:
        self.start()
        self._next_id += 1
        mid = self._next_id
        self._send({"op": "ping", "id": mid})
        return self._wait(lambda m: m.get("id") == mid, timeout_s, "answering a ping")["info"]
