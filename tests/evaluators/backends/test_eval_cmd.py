"""`genome eval` input errors: one line on stderr, exit 1, checked before any engine starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _genome(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "GENOME_DEBUG": "0"})


@pytest.mark.slow
def test_eval_refuses_bad_adapters_before_starting_an_engine(model_path, make_peft_adapter, tmp_path):
    out = _genome("eval", "--model_path", str(model_path), "--tasks", "arc_c", "--n", "1",
                  "--adapter", str(tmp_path / "missing"))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == f"genome: error: adapter folder not found: {tmp_path / 'missing'}"

    big = make_peft_adapter(tmp_path / "r32", rank=32, alpha=32)
    out = _genome("eval", "--model_path", str(model_path), "--tasks", "arc_c", "--n", "1", "--adapter", str(big),
                  "--max_lora_rank", "16")
    assert out.returncode == 1
    assert "LoRA rank 32 is above max_lora_rank=16" in out.stderr.strip().splitlines()[-1]

    out = _genome("eval", "--model_path", str(model_path), "--tasks", "no_such_task")
    assert out.returncode == 1 and "unknown task 'no_such_task'" in out.stderr


@pytest.mark.slow
def test_eval_refuses_bad_loglik_items_before_starting_an_engine(model_path, tmp_path):
    """--scoring loglik: a WinoGrande sentence with two blanks, or letter scoring of WinoGrande, is one line, exit 1,
    nothing on stdout."""
    good = {"question": "A _ b.", "choices": {"A": "x", "B": "y"}, "answer": "A", "id": "g"}
    (tmp_path / "winogrande.json").write_text(json.dumps(
        {"dev": [good, {**good, "question": "_ and _", "id": "two"}], "test": [good]}))
    out = _genome("eval", "--model_path", str(model_path), "--tasks", "winogrande", "--data_dir", str(tmp_path),
                  "--scoring", "loglik")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        f"genome: error: {tmp_path / 'winogrande.json'}: dev item 1 (id 'two'): a WinoGrande sentence needs "
        "exactly one '_' blank, found 2")
    out = _genome("eval", "--model_path", str(model_path), "--tasks", "winogrande", "--scoring", "choice_logprob")
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "genome: error: task 'winogrande' is a fill-in-the-blank task scored only with 'loglik' (partial scoring), "
        "not 'choice_logprob'")


@pytest.mark.slow
def test_eval_backend_jax_refuses_vllm_options_and_generate_tasks(model_path, capsys):
    """--backend jax: vLLM-only options and tasks that generate are one line, exit 1, before any model loads."""
    from scripts import cli

    base = ["eval", "--model_path", str(model_path), "--backend", "jax", "--n", "1"]
    for extra, line in ((["--tasks", "arc_c", "--endpoints", "http://127.0.0.1:1"], "--endpoints needs --backend vllm"),
                        (["--tasks", "arc_c", "--eval_mode", "swap"], "--eval_mode needs --backend vllm"),
                        (["--tasks", "arc_c", "--dtype", "int8"],
                         "--dtype int8 with --backend jax: float32 or bfloat16"),
                        (["--tasks", "gsm8k"], "--backend jax scores choice_logprob and loglik tasks only; task "
                                               "'gsm8k' uses 'generate'")):
        assert cli.main([*base, *extra]) == 1
        out = capsys.readouterr()
        assert out.out == "" and out.err.strip().splitlines()[-1] == f"genome: error: {line}"


@pytest.mark.slow
def test_eval_jax_and_vllm_backends_give_the_same_predictions(model_path, capsys):
    """`genome eval --backend jax` and `--backend vllm` (float32 engine, so near-ties agree) on the base model, 24
    PIQA dev items under loglik: the same per-item predictions and metrics, option probabilities within 1e-3."""
    from scripts import cli

    common = ["eval", "--model_path", str(model_path), "--tasks", "piqa", "--scoring", "loglik", "--n", "24",
              "--details"]
    out = {}
    for backend in ("jax", "vllm"):
        assert cli.main([*common, "--backend", backend, "--dtype", "float32"]) == 0
        out[backend] = json.loads(capsys.readouterr().out)
    assert (out["jax"]["backend"], out["jax"]["dtype"]) == ("jax", "float32")
    assert out["vllm"]["backend"] == "managed" and out["vllm"]["dtype"] == "float32"
    jax_r, vllm_r = out["jax"]["details"]["base"]["piqa"], out["vllm"]["details"]["base"]["piqa"]
    assert len(jax_r["predictions"]) == 24 and len(set(jax_r["predictions"])) == 2  # both labels occur
    assert jax_r["predictions"] == vllm_r["predictions"]
    assert out["jax"]["metrics"] == out["vllm"]["metrics"]
    for a, b in zip(jax_r["option_probs"], vllm_r["option_probs"]):
        assert a == pytest.approx(b, abs=1e-3)
