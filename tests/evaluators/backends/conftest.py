"""Shared fixtures of the backend tests: ONE managed vLLM worker for the whole session (real engine, real SmolLM2,
fp32, LoRA enabled so that one engine serves both the weight-swap and the multi-LoRA path), real PEFT adapters,
and a small request set built by the real tasks."""
from __future__ import annotations

import pytest

from evaluators.protocol import ChoiceRequest, GenerateRequest


@pytest.fixture(scope="session")
def backend_adapters(tmp_path_factory, make_peft_adapter):
    """Two real PEFT adapters: q/v rank 8 (alpha 16), and all seven linear modules rank 4 with rsLoRA.

    scale=3 makes ΔW large enough that the answers differ visibly from the base model's."""
    root = tmp_path_factory.mktemp("backend_adapters")
    qv = make_peft_adapter(root / "qv_r8", rank=8, alpha=16, seed=1, scale=3.0)
    every = make_peft_adapter(root / "all_r4_rslora", rank=4, alpha=8, seed=2, scale=3.0, use_rslora=True,
                              target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"))
    return [str(qv), str(every)]


@pytest.fixture(scope="session")
def backend_requests(model_path):
    """2 MMLU choice requests (options " A".." D"), one with an option far outside the top-k (" zebra"), one with
    multi-token options, and one short greedy GSM8K generation."""
    from evaluators.tasks import GenerationConfig, get_task

    mmlu = get_task("mmlu", formatter=str(model_path))
    reqs = mmlu.build_requests(mmlu.load("dev", 2), mmlu.mode)
    reqs.append(ChoiceRequest(prompt=reqs[0].prompt, options=(" A", " zebra", " B")))
    reqs.append(ChoiceRequest(prompt="The capital of France is", options=(" Paris", " Berlin, Germany", " London")))
    gsm = get_task("gsm8k", formatter=str(model_path), generation=GenerationConfig(max_tokens=8))
    reqs += gsm.build_requests(gsm.load("dev", 1), gsm.mode)
    assert isinstance(reqs[-1], GenerateRequest)
    return reqs


@pytest.fixture(scope="session")
def managed_worker(model_path, tmp_path_factory):
    """The session's one managed worker (started on first use, closed at the end of the session)."""
    from evaluators.backends.managed import ManagedBackend

    log = tmp_path_factory.mktemp("worker_log") / "worker.log"
    backend = ManagedBackend(str(model_path), mode="swap", dtype="float32", enable_lora=True, max_lora_rank=16,
                             max_loras=2, max_model_len=2048, log_path=str(log))
    backend.start()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def reference_answers(model_path, smollm2_fp32, smollm2_tokenizer):
    """reference_answers(adapter_dir | None, requests) -> the transformers (+ peft) fp32 answers, the anchor every
    backend is checked against. The peft wrapper is unloaded again so the shared base model stays plain."""
    from peft import PeftModel

    from evaluators.reference import answer_with_transformers

    def answers(adapter, requests):
        model = smollm2_fp32 if adapter is None else PeftModel.from_pretrained(smollm2_fp32, adapter)
        try:
            return answer_with_transformers(str(model_path), requests, _loaded=(model, smollm2_tokenizer))
        finally:
            if adapter is not None:
                model.unload()

    return answers
