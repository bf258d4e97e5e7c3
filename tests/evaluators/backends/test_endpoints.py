"""The external-endpoints backend against a real OpenAI-compatible vLLM server started here on 127.0.0.1 (runtime LoRA
loading on), tiny scale: answers equal transformers+peft, individuals spread over the endpoints, adapters unloaded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from evaluators.errors import EvaluatorCrashed, UserError
from evaluators.protocol import GenerateResponse


def test_bad_and_unreachable_endpoints_fail_clearly():
    from evaluators.backends.endpoints import EndpointsBackend

    with pytest.raises(UserError, match="expected http://host:port"):
        EndpointsBackend(["127.0.0.1:8000"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = EndpointsBackend([f"http://127.0.0.1:{port}"])
    with pytest.raises(EvaluatorCrashed, match=f"127.0.0.1:{port} is unreachable"):
        b.answer([(None, None, [])])


@pytest.fixture
def vllm_server(model_path, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with runtime LoRA updates; killed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--enable-lora",
         "--max-lora-rank", "16", "--max-loras", "2", "--max-model-len", "2048", "--seed", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vLLM server did not come up"
            time.sleep(1.0)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.mark.slow
def test_endpoints_backend_matches_reference(vllm_server, model_path, backend_adapters, backend_requests,
                                             reference_answers):
    from evaluators.backends.endpoints import EndpointsBackend
    qv = backend_adapters[0]
    reqs = backend_requests[1:]  # one MMLU question, the " zebra" one, multi-token options, a generation
    # the same server twice (with and without /v1): two endpoints, so the spreading is visible
    b = EndpointsBackend([vllm_server, vllm_server + "/v1"], per_endpoint=1)
    res, timing = b.answer([(None, None, reqs), (qv, None, reqs)])
    assert timing["jobs_per_endpoint"] == [1, 1]  # base alone first (on the first), the adapter on the idle one
    with urllib.request.urlopen(vllm_server + "/v1/models", timeout=10) as r:  # adapters were unloaded again
        assert [m["id"] for m in json.load(r)["data"]] == [str(model_path)]

    for adapter, got in ((None, res[0]), (qv, res[1])):
        ref = reference_answers(adapter, reqs)
        for req, a, want in zip(reqs, got, ref):
            if isinstance(want, GenerateResponse):
                assert a.text == want.text, adapter
            else:
                assert a.logprobs == pytest.approx(want.logprobs, abs=2e-3), (adapter, req.options)
    assert res[0] != res[1]
