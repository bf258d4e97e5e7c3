"""`--eval_devices`: one managed vLLM worker per device, individuals balanced over them, a crashed worker's chunk
redone. On this CPU machine the two workers are two CPU engines (CUDA_VISIBLE_DEVICES is set and harmless)."""
from __future__ import annotations

import os
import signal

import pytest

from evaluators.backends.device_pool import DevicePoolBackend, parse_devices
from evaluators.errors import UserError


def test_parse_devices():
    assert parse_devices("0,1,2,3") == ["0", "1", "2", "3"]
    assert parse_devices(" 2, 5 ") == ["2", "5"]
    assert parse_devices([0, 3]) == ["0", "3"]
    assert parse_devices("GPU-8f6e2a1c-0000-1111-2222-333344445555") == ["GPU-8f6e2a1c-0000-1111-2222-333344445555"]
    for bad, msg in (("", "comma-separated"), ("0,,1", "comma-separated"), ("0,cuda:1", "'cuda:1'"),
                     ("1,1", "listed twice")):
        with pytest.raises(UserError, match=msg):
            parse_devices(bad)


def test_each_member_sees_only_its_device(tmp_path):
    pool = DevicePoolBackend("/nowhere", "3,1", log_dir=str(tmp_path), env={"FOO": "bar"})
    assert [m.env for m in pool.members] == [{"FOO": "bar", "CUDA_VISIBLE_DEVICES": "3"},
                                              {"FOO": "bar", "CUDA_VISIBLE_DEVICES": "1"}]
    assert len({m.log_path for m in pool.members}) == 2
    assert pool._chunk(10) == 3 and pool._chunk(1) == 1


def test_make_evaluator_routes_eval_devices(model_path):
    from evaluators.backends import make_evaluator
    from evaluators.backends.managed import ManagedBackend

    ev = make_evaluator(str(model_path), eval_devices="0,1")
    assert isinstance(ev.backend, DevicePoolBackend) and ev.backend.devices == ["0", "1"]
    one = make_evaluator(str(model_path), eval_devices="2")
    assert isinstance(one.backend, ManagedBackend) and one.backend.env == {"CUDA_VISIBLE_DEVICES": "2"}
    with pytest.raises(UserError, match="eval_devices"):
        make_evaluator(str(model_path), eval_devices="a,b")


@pytest.mark.slow
def test_two_workers_balance_and_redo_a_crashed_workers_chunk(tmp_path, model_path, make_peft_adapter,
                                                              smollm2_fp32, smollm2_tokenizer):
    from evaluators.backends.peft_folder import content_hash
    from evaluators.reference import answer_with_transformers
    from evaluators.tasks import get_task

    adapters = [str(make_peft_adapter(tmp_path / f"ad{i}", rank=4, alpha=8, seed=10 + i, scale=3.0)) for i in range(3)]
    task = get_task("arc_c", formatter=str(model_path))
    reqs = task.build_requests(task.load("dev", 2), task.mode)
    jobs = [(a, None if a is None else content_hash(a), reqs) for a in adapters + [None]]
    pool = DevicePoolBackend(str(model_path), "0,1", chunk=1, retries=1, log_dir=str(tmp_path), max_model_len=1024,
                             dtype="float32")
    try:
        infos = pool.start()
        assert [i["device"] for i in infos] == ["0", "1"] and infos[0]["pid"] != infos[1]["pid"]
        clean, timing = pool.answer(jobs)
        assert sorted(timing["jobs_per_engine"]) != [0, len(jobs)] and sum(timing["jobs_per_engine"]) == len(jobs)
        ref = answer_with_transformers(str(model_path), reqs, _loaded=(smollm2_fp32, smollm2_tokenizer))
        for got, want in zip(clean[-1], ref):
            assert got.logprobs == pytest.approx(want.logprobs, abs=2e-3)
        assert clean[0] != clean[-1]

        killed = []

        def crash_other(done):  # first answer back: kill the worker of a member that is still scoring
            if not killed:
                victim = pool.members[sorted(pool.busy)[0]]
                killed.append(victim.proc.pid)
                os.killpg(victim.proc.pid, signal.SIGKILL)

        again, timing2 = pool.answer(jobs, on_progress=crash_other)
        assert killed and timing2["restarts"] >= 1
        assert again == clean
    finally:
        pool.close()
    assert all(m.proc is None for m in pool.members)
    for pid in killed:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
