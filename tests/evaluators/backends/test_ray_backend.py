"""The Ray backend: adapters shipped as bytes, work balanced over engine actors, a killed actor replaced and redone.

The slow test runs a real local Ray cluster (2 CPUs) with two real vLLM CPU engines on SmolLM2-135M, scores real
PEFT adapters on real ARC-Challenge items, checks the answers against the transformers reference, then kills one
actor mid-run and checks that the answers are exactly those of the run without the fault. Every Ray process is
gone when it ends.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from evaluators.backends import ray_backend as rb  # noqa: E402
from evaluators.errors import UserError  # noqa: E402


# ---- fast: adapters as bytes ------------------------------------------------------------------------------------

def _folder(tmp_path, name="ad", files=None):
    d = tmp_path / name
    d.mkdir()
    for k, v in (files or {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": os.urandom(4096)}).items():
        (d / k).write_bytes(v)
    return d


def test_pack_unpack_round_trip_is_byte_exact(tmp_path):
    src = _folder(tmp_path)
    packed = rb.pack_adapter(str(src))
    assert sorted(packed) == ["adapter_config.json", "adapter_model.safetensors"]
    root = tmp_path / "root"
    root.mkdir()
    key = rb.packed_key(packed)
    out = rb.unpack_adapter(packed, str(root), key)
    assert out == str(root / key)
    for name in packed:
        assert (root / key / name).read_bytes() == (src / name).read_bytes()
    assert os.listdir(root) == [key]  # no temp folder left behind
    assert rb.unpack_adapter(packed, str(root), key) == out  # idempotent


def test_packed_key_depends_on_content_and_names(tmp_path):
    a = rb.pack_adapter(str(_folder(tmp_path, "a", {"x": b"1", "y": b"2"})))
    b = rb.pack_adapter(str(_folder(tmp_path, "b", {"x": b"1", "y": b"3"})))
    c = rb.pack_adapter(str(_folder(tmp_path, "c", {"x": b"1", "z": b"2"})))
    same = rb.pack_adapter(str(_folder(tmp_path, "d", {"y": b"2", "x": b"1"})))
    assert len({rb.packed_key(p) for p in (a, b, c)}) == 3
    assert rb.packed_key(a) == rb.packed_key(same)


def test_bad_adapters_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        rb.pack_adapter(str(tmp_path / "missing"))
    d = _folder(tmp_path)
    (d / "sub").mkdir()
    with pytest.raises(UserError, match="subfolder 'sub'"):
        rb.pack_adapter(str(d))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UserError, match="bad file name"):
        rb.unpack_adapter({"../evil": b"x"}, str(root), "k")


def test_orphan_scratch_folders_of_dead_actors_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"{rb._SCRATCH}{dead_pid}-abc").mkdir()
    (tmp_path / f"{rb._SCRATCH}{os.getpid()}-def").mkdir()  # alive: ours
    (tmp_path / "unrelated").mkdir()
    rb._remove_orphans(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([f"{rb._SCRATCH}{os.getpid()}-def", "unrelated"])


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="num_actors must be >= 1"):
        rb.RayBackend("/nowhere", num_actors=0)
    with pytest.raises(UserError, match="mode must be auto, swap or lora"):
        rb.RayBackend("/nowhere", mode="fast")


# ---- slow: two real vLLM actors on a local Ray cluster ----------------------------------------------------------

def _ray_processes() -> list[int]:
    import psutil

    me = psutil.Process()
    return [p.pid for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_two_engine_actors_balance_work_and_survive_a_killed_actor(tmp_path, model_path, make_peft_adapter,
                                                                    smollm2_fp32, smollm2_tokenizer):
    from peft import PeftModel

    from evaluators.backends.base import Evaluator
    from evaluators.backends.cache import ResultCache, cache_key, requests_digest
    from evaluators.backends.peft_folder import content_hash
    from evaluators.reference import answer_with_transformers
    from evaluators.tasks import get_task

    t0 = time.monotonic()
    adapters = [str(make_peft_adapter(tmp_path / f"ad{i}", rank=4, alpha=8, seed=i, scale=3.0)) for i in range(3)]
    task = get_task("arc_c", formatter=str(model_path))
    items = task.load("dev", 2)
    reqs = task.build_requests(items, task.mode)
    individuals = adapters + [None]
    jobs = [(a, None if a is None else content_hash(a), reqs) for a in individuals]

    before = set(_ray_processes())
    backend = rb.RayBackend(str(model_path), num_actors=2, max_model_len=1024, dtype="float32",
                            ray_init_kwargs={"num_cpus": 2, "object_store_memory": 100 * 1024**2})
    try:
        infos = backend.start()
        assert len(infos) == 2 and infos[0]["pid"] != infos[1]["pid"]
        t_start = time.monotonic()

        # 1. no fault: every individual answered, both engines used
        clean, timing = backend.answer(jobs)
        assert sum(timing["jobs_per_actor"]) == len(jobs) and min(timing["jobs_per_actor"]) >= 1, timing
        assert timing["replaced"] == 0
        t_clean = time.monotonic()
        # answers agree with the transformers reference (fp32 engine vs fp32 transformers + peft)
        refs = {len(jobs) - 1: answer_with_transformers(str(model_path), reqs, _loaded=(smollm2_fp32, smollm2_tokenizer))}
        peft_model = PeftModel.from_pretrained(smollm2_fp32, adapters[0], is_trainable=False).eval()
        try:
            refs[0] = answer_with_transformers(str(model_path), reqs, _loaded=(peft_model, smollm2_tokenizer))
        finally:
            peft_model.unload()
        for i, ref in refs.items():
            for got, want in zip(clean[i], ref):
                assert got.logprobs == pytest.approx(want.logprobs, abs=2e-3)
        # the adapters really change the answers (so a mix-up of individuals would be seen)
        assert clean[0] != clean[-1] and clean[0] != clean[1]

        # 2. through the facade (empty cache), killing a busy actor as soon as the first individual is back: it is
        # replaced, its individual is scored again, and every answer is exactly the one of the run without fault
        killed = []

        def kill_one(done):
            if not killed:
                victim = backend.slots[sorted(backend.busy)[0]]  # one that holds an individual right now
                killed.append(victim.index)
                ray.kill(victim.actor)

        answer = backend.answer
        backend.answer = lambda jobs, **kw: answer(jobs, **{**kw, "on_progress": kill_one})
        ev = Evaluator(backend, model=str(model_path), cache=ResultCache())
        results = ev.evaluate(individuals, [task], "dev", 2)
        assert killed and backend.replaced == 1 and ev.last_timing["replaced"] == 1
        digest = requests_digest(reqs)
        for (_, key, _), r, want in zip(jobs, results, clean):
            got = ev.cache.get(cache_key(str(model_path), key or "base", task.name, "dev", 2, task.mode, digest,
                                         ev.numerics()))
            assert got == want
            assert r.tasks[task.name] == task.score(items, want, task.mode)
        t_fault = time.monotonic()
        print(f"\nadapters+start {t_start - t0:.1f}s, clean run {t_clean - t_start:.1f}s, "
              f"faulty run {t_fault - t_clean:.1f}s")
    finally:
        backend.close()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while set(_ray_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (set(_ray_processes()) - before), "Ray/vLLM processes outlived the backend"
    assert not [n for n in os.listdir(rb._scratch_base()) if n.startswith(rb._SCRATCH)]
