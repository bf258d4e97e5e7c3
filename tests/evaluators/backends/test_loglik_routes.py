"""`loglik` requests (option texts of several tokens, WinoGrande's one-option requests, a long BoolQ context) on
both routes of the managed vLLM worker (prompt_logprobs) against the transformers fp32 reference, and the same
per-sample predictions on every route. Shares the session's one worker (conftest.managed_worker)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from evaluators.backends.worker import Engine
from evaluators.tasks import LOGLIK, get_task

TOL = 2e-4  # summed log-probs of up to ~30 tokens, fp32 engine vs fp32 transformers


@pytest.fixture(scope="module")
def loglik_batch(model_path):
    """[(task, items, requests)] for arc_e (2 items), winogrande (2 items = 4 requests) and boolq (1 item)."""
    out = []
    for name, n in (("arc_e", 2), ("winogrande", 2), ("boolq", 1)):
        task = get_task(name, mode=LOGLIK, formatter=str(model_path))
        items = task.load("dev", n)
        out.append((task, items, task.build_requests(items)))
    return out


def _jobs(adapters, reqs):
    from evaluators.backends.peft_folder import content_hash

    return [(a, None if a is None else content_hash(a), reqs) for a in adapters]


def test_loglik_swap_and_lora_routes_equal_transformers(managed_worker, backend_adapters, smollm2_tokenizer,
                                                        loglik_batch, reference_answers):
    reqs = [r for _, _, rs in loglik_batch for r in rs]
    assert max(len(smollm2_tokenizer(o, add_special_tokens=False)["input_ids"]) for r in reqs for o in r.options) > 5
    adapters = [None, backend_adapters[0]]
    swap, _ = managed_worker.answer(_jobs(adapters, reqs), mode="swap")
    lora, _ = managed_worker.answer(_jobs(adapters, reqs), mode="lora")
    again, _ = managed_worker.answer(_jobs([None], reqs), mode="swap")  # prefix cache warm: same answers
    for adapter, s, l in zip(adapters, swap, lora):
        ref = reference_answers(adapter, reqs)
        for req, a, b, c in zip(reqs, s, l, ref):
            assert a.logprobs == pytest.approx(c.logprobs, abs=TOL), (adapter, req)
            assert b.logprobs == pytest.approx(c.logprobs, abs=TOL), (adapter, req)
        # the same per-sample predictions, acc and acc_norm on every route
        pos = 0
        for task, items, rs in loglik_batch:
            got = [task.score(items, x[pos:pos + len(rs)]) for x in (s, l, ref)]
            assert got[0].predictions == got[1].predictions == got[2].predictions, task.name
            assert got[0].metrics == got[1].metrics == got[2].metrics, task.name
            pos += len(rs)
    for a, b in zip(again[0], swap[0]):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert max(abs(x - y) for a, b in zip(swap[0], swap[1]) for x, y in zip(a.logprobs, b.logprobs)) > 0.05


def test_outputs_with_cache_hits_inside_the_options_are_rescored():
    """prompt_logprobs exist only after the prefix-cache hit: an output whose hit reaches past the prompt's last
    token is named for a second pass, others are not."""
    plan = [("choice", 0, None), ("prompt_lp", 1, (10, [[5, 6], [7]])), ("gen", 3, None)]
    outs = [SimpleNamespace(num_cached_tokens=n) for n in (32, 9, 10, 64)]
    assert Engine.uncomputed(outs, plan) == [2]
    outs[1].num_cached_tokens = None
    assert Engine.uncomputed(outs, plan) == [2]
