"""Safety defaults: the managed engine listens on loopback only, model code from a checkpoint is never run
(trust_remote_code off), adapters are never unpickled.

The live checks run where the real engine runs: loopback sockets in test_evaluator_crash.py (on the worker of a
real `genome run`), pickle payloads and custom-code models through the CLI in test_bad_inputs.py. Here: the
defaults themselves, a real worker refusing a custom-code model without running it, and a scan of our sources.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from rel_helpers import REPO


def test_worker_environment_pins_sockets_to_loopback(monkeypatch):
    from evaluators.backends.managed import worker_env

    for k in ("VLLM_HOST_IP", "VLLM_LOOPBACK_IP", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(k, raising=False)
    env = worker_env()
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_LOOPBACK_IP"] == "127.0.0.1"
    if sys.platform.startswith("linux"):
        assert env["GLOO_SOCKET_IFNAME"] == "lo"


def _python_sources():
    for pkg in ("genome_jax", "evaluators", "scripts", "kernels"):
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_no_unpickling_and_no_remote_code_in_our_sources():
    """No call of torch.load / pickle.load(s) / numpy allow_pickle anywhere in the package; every
    trust_remote_code we pass is False."""
    calls = re.compile(r"\b(torch\.load|pickle\.loads?|dill\.loads?|cloudpickle\.loads?)\s*\(|allow_pickle\s*=\s*True")
    remote = re.compile(r"trust_remote_code\s*=\s*(?!False\b)")
    offenders = []
    for path in _python_sources():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            stripped = code.strip()
            if stripped.startswith(("f\"", "\"", "'", "f'")):  # inside a message string (the conversion hint)
                continue
            if calls.search(code) or remote.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


def _custom_code_model(model_path: Path, where: Path) -> tuple[Path, Path]:
    """A copy of the real model whose config.json maps to custom code that would leave a marker if it ran."""
    where.mkdir()
    marker = where.parent / "CUSTOM_CODE_RAN"
    for f in Path(model_path).iterdir():
        if f.name != "config.json" and f.is_file():
            (where / f.name).symlink_to(f)
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (where / "config.json").write_text(json.dumps(cfg))
    (where / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return where, marker


@pytest.mark.slow
def test_real_worker_never_runs_model_code(model_path, tmp_path):
    """Below the CLI's own check (it refuses auto_map up front): the engine itself, asked to load such a model,
    fails to start and the custom code never runs."""
    from evaluators.backends.managed import ManagedBackend
    from evaluators.errors import EvaluatorCrashed

    model, marker = _custom_code_model(model_path, tmp_path / "model")
    backend = ManagedBackend(str(model), mode="swap", log_path=str(tmp_path / "worker.log"), startup_timeout_s=600)
    try:
        with pytest.raises(EvaluatorCrashed, match="could not start") as refused:
            backend.start()
        assert "trust_remote_code" in str(refused.value)  # refused for that reason, not another
    finally:
        backend.close()
    assert not marker.exists(), "the model's custom code ran"
