"""The managed vLLM worker on the real engine: weight swap == multi-LoRA == transformers+peft, the result cache,
rank refusal, and fault detection (a hung worker and a killed worker). All engine tests share ONE worker
(conftest.managed_worker); the test that kills it comes last in this file."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest

from evaluators.errors import EvaluatorCrashed, UserError
from evaluators.protocol import ChoiceResponse, GenerateRequest, GenerateResponse

pytestmark = pytest.mark.slow


def _jobs(adapters, reqs):
    from evaluators.backends.peft_folder import content_hash

    return [(a, None if a is None else content_hash(a), reqs) for a in [None, *adapters]]


@pytest.fixture(scope="module")
def swap_answers(managed_worker, backend_adapters, backend_requests):
    res, timing = managed_worker.answer(_jobs(backend_adapters, backend_requests), mode="swap")
    assert timing["swap_s"] > 0 and len(timing["per_job"]) == 3
    return res


def test_swap_equals_lora_path(managed_worker, backend_adapters, backend_requests, swap_answers):
    """The two protocols agree: base + the q/v adapter through vLLM's multi-LoRA path, both in flight (the
    all-module adapter is left to the reference test: vLLM's CPU LoRA path is ~10x slower than a swap)."""
    lora, timing = managed_worker.answer(_jobs(backend_adapters[:1], backend_requests), mode="lora")
    assert timing["lora_load_s"] > 0
    for ind, (s, l) in enumerate(zip(swap_answers, lora)):
        for req, a, b in zip(backend_requests, s, l):
            if isinstance(req, GenerateRequest):
                assert a.text == b.text and a.text, (ind, a, b)  # same greedy output
            else:
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4), (ind, req.options)
    # the adapters change the answers (the comparison above is not base vs base)
    assert max(abs(x - y) for x, y in zip(swap_answers[0][0].logprobs, swap_answers[1][0].logprobs)) > 0.05
    assert swap_answers[0][0] != swap_answers[2][0]


def test_swap_equals_transformers_peft_reference(backend_adapters, backend_requests, swap_answers, reference_answers):
    """The correctness anchor: every answer of the swap path equals plain transformers (+ peft) in fp32, including
    an option far outside the top-20 (" zebra") and multi-token options."""
    zebra = backend_requests[2]
    assert " zebra" in zebra.options
    for adapter, got in zip([None, *backend_adapters], swap_answers):
        ref = reference_answers(adapter, backend_requests)
        for req, a, b in zip(backend_requests, got, ref):
            if isinstance(b, GenerateResponse):
                assert a.text == b.text, adapter
            else:
                assert a.logprobs == pytest.approx(b.logprobs, abs=2e-3), (adapter, req.options)
        assert got[2].logprobs[1] < -10  # " zebra" really is far outside the top-k


def test_cache_hit_skips_scoring(model_path, managed_worker, backend_adapters, tmp_path):
    from evaluators.backends.base import Evaluator
    from evaluators.tasks import get_task

    task = get_task("arc_c", formatter=str(model_path))
    ev = Evaluator(managed_worker, model=str(model_path))  # shares the session's worker; never closed here
    first = ev.evaluate([backend_adapters[0], None], [task], "dev", 2)
    assert ev.backend_calls == 1 and not any(r.cached for r in first)
    copy = str(tmp_path / "elite")  # an elite re-exported to a new folder: same bytes, same key
    shutil.copytree(backend_adapters[0], copy)
    again = ev.evaluate([copy, None], [task], "dev", 2)
    assert ev.backend_calls == 1 and all(r.cached for r in again)
    assert [r.tasks[task.name] for r in again] == [r.tasks[task.name] for r in first]
    # a changed split size is a different key; only what is missing is scored
    ev.evaluate([copy], [task], "dev", 1)
    assert ev.backend_calls == 2 and ev.last_timing["jobs"] == 1


def test_cache_key_separates_route_and_dtype(model_path, managed_worker, backend_adapters):
    """The same individual scored through the swap and through the LoRA route is two cache entries: a run resumed
    with another --eval_mode never reuses fitness computed with other numerics."""
    from evaluators.backends.base import Evaluator
    from evaluators.tasks import get_task

    task = get_task("arc_c", formatter=str(model_path))
    ev = Evaluator(managed_worker, model=str(model_path))
    assert ev.numerics("swap") == "swap:float32" and ev.numerics("lora") == "lora:float32"
    ev.evaluate([backend_adapters[0]], [task], "dev", 1, mode="swap")
    ev.evaluate([backend_adapters[0]], [task], "dev", 1, mode="lora")
    assert ev.backend_calls == 2 and len(ev.cache) == 2
    ev.evaluate([backend_adapters[0]], [task], "dev", 1, mode="swap")
    assert ev.backend_calls == 2  # the swap answer is still served from the cache


def _native_bf16() -> bool:
    from evaluators.backends.worker import cpu_has_bf16

    return cpu_has_bf16()


@pytest.mark.skipif(not _native_bf16(), reason="this CPU emulates bf16 (no AVX512-BF16/AMX): the swap's default is "
                                               "float32 here, and a bf16 engine is ~3x slower (measured by "
                                               "`genome bench eval` instead)")
def test_bf16_swap_agrees_with_fp32_swap(model_path, managed_worker, backend_adapters, tmp_path):
    """The default engine on a CPU with native bf16 (the model's bf16) with W + ΔW rounded once to bf16 chooses the
    same MMLU option as the float32 swap on (nearly) every sample, and the adapters still move its answers (ΔW is
    not rounded away); the shared result cache never serves float32 answers to the bf16 engine."""
    from evaluators.backends.base import Evaluator
    from evaluators.backends.cache import ResultCache
    from evaluators.backends.managed import ManagedBackend
    from evaluators.tasks import get_task

    task = get_task("mmlu", formatter=str(model_path))
    n = 16
    cache = ResultCache()
    ev32 = Evaluator(managed_worker, model=str(model_path), cache=cache)
    want = ev32.evaluate([None, *backend_adapters], [task], "dev", n, mode="swap")
    bf16 = ManagedBackend(str(model_path), mode="swap", max_model_len=2048, log_path=str(tmp_path / "bf16.log"))
    try:
        ev16 = Evaluator(bf16, model=str(model_path), cache=cache)
        assert ev16.numerics() == "swap:bfloat16"
        got = ev16.evaluate([None, *backend_adapters], [task], "dev", n)
        assert ev16.backend_calls == 1 and not any(r.cached for r in got)
    finally:
        bf16.close()
    pg = [r.tasks[task.name].predictions for r in got]
    pw = [r.tasks[task.name].predictions for r in want]
    same = sum(a == b for g, w in zip(pg, pw) for a, b in zip(g, w)) / (len(pg) * n)
    print(f"\nbf16 vs fp32 swap: same prediction on {100 * same:.1f}% of {len(pg) * n} samples")
    assert same >= 0.85
    probs = [r.tasks[task.name].option_probs for r in got]
    assert probs[1] != probs[0] and probs[2] != probs[0]  # each adapter changed the bf16 engine's answers


def test_rank_above_max_lora_rank_is_refused_before_any_work(model_path, managed_worker, make_peft_adapter,
                                                             tmp_path):
    from evaluators.backends.base import Evaluator
    from evaluators.tasks import get_task

    big = make_peft_adapter(tmp_path / "r32", rank=32, alpha=32)
    ev = Evaluator(managed_worker, model=str(model_path), max_lora_rank=16)
    with pytest.raises(UserError, match=r"r32: LoRA rank 32 is above max_lora_rank=16"):
        ev.evaluate([None, str(big)], [get_task("arc_c", formatter=str(model_path))], "dev", 1)
    assert ev.backend_calls == 0


def test_hung_worker_is_detected(model_path, tmp_path):
    """A worker that stops answering (SIGSTOP, during its start) is declared hung after stall_timeout_s and killed."""
    from evaluators.backends.managed import ManagedBackend

    b = ManagedBackend(str(model_path), stall_timeout_s=4, heartbeat_s=0.5, log_path=str(tmp_path / "w.log"))
    err: list = []
    th = threading.Thread(target=lambda: err.append(pytest.raises(EvaluatorCrashed, b.start)), daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while b.proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = b.proc.pid
    time.sleep(1.0)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    th.join(60)
    assert not th.is_alive() and time.monotonic() - t0 < 30
    assert "sent nothing" in str(err[0].value)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert b.proc is None


def test_stuck_worker_is_detected(model_path, tmp_path):
    """A worker that beats but never answers (here: still starting its engine) trips idle_timeout_s."""
    from evaluators.backends.managed import ManagedBackend

    b = ManagedBackend(str(model_path), idle_timeout_s=3, heartbeat_s=0.5, log_path=str(tmp_path / "w.log"))
    t0 = time.monotonic()
    with pytest.raises(EvaluatorCrashed, match="made no progress for 3s"):
        b.start()
    assert time.monotonic() - t0 < 30 and b.proc is None


def test_killed_worker_is_detected_and_engine_survives(managed_worker, backend_adapters, backend_requests):
    """SIGKILL the worker mid-scoring: the call fails fast with EvaluatorCrashed (no retry by default), this process
    lives on, nothing of the worker's process group is left. Runs last: it ends the session's worker."""
    gen = [GenerateRequest(prompt=r.prompt, max_tokens=200) for r in backend_requests if isinstance(r, GenerateRequest)]
    jobs = _jobs(backend_adapters, gen * 4)
    pid = managed_worker.proc.pid
    box: dict = {}

    def call():
        try:
            managed_worker.answer(jobs, mode="swap")
        except BaseException as e:  # noqa: BLE001
            box["err"] = e

    th = threading.Thread(target=call, daemon=True)
    th.start()
    time.sleep(3.0)  # the worker is scoring by now
    assert th.is_alive()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    th.join(60)
    assert not th.is_alive() and time.monotonic() - t0 < 15
    assert isinstance(box.get("err"), EvaluatorCrashed)
    assert "killed by signal 9" in str(box["err"])
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert managed_worker.proc is None  # the next call would start a fresh worker
