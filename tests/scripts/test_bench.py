"""The benchmarks that need no vLLM engine, at tiny shapes (seconds): `genome bench operators` times the strategy's
real `ask` and measures compile cold/warm in fresh processes; `genome bench gpu` runs its tiny CPU variant. Their
byte and FLOP counts are checked against hand counts."""
from __future__ import annotations

import re

import pytest

from tests.scripts.cli_helpers import run_cli


def test_minimum_bytes_and_llc():
    from scripts.bench_operators import llc_bytes, minimum_bytes

    llc = llc_bytes()
    assert llc is None or llc >= 1 << 20  # a last-level cache is at least a MiB on anything we run on
    S = 1000
    # population of 10 x S = 10 kB fits a 1 MiB cache: parents once + children once
    assert minimum_bytes(10, 10, S, 1 << 20, 10 * S) == 20 * S
    # a population above the cache is read a second time; unknown cache: assume it does not fit
    assert minimum_bytes(10, 6, S, 5 * S, 10 * S) == 26 * S
    assert minimum_bytes(10, 6, S, None, 10 * S) == 26 * S


def test_forward_flops_by_hand():
    from scripts.bench_gpu import SCORER_SHAPES, _forward_flops, llama_config

    c = llama_config(SCORER_SHAPES["tiny"])  # hidden 64, MLP 128, 4 heads x 16, 2 KV heads, 1 layer
    weights = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128  # q, o; k, v; gate, up, down
    attn = 2 * 16 * 4 * 16  # causal QK^T + PV at T = 16
    assert _forward_flops(c, tokens=10, seq=16) == 2 * 10 * (weights + attn // 2)
    lora = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # rank 4
    assert _forward_flops(c, tokens=10, seq=16, rank=4) - _forward_flops(c, tokens=10, seq=16) == 10 * lora


@pytest.mark.slow
def test_bench_operators_tiny(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    rc, out, err = run_cli(["bench", "operators", "--population", "4", "--layers", "1", "--scaling", "--repeats", "1",
                            "--baseline-children", "1", "--probe-mb", "8", "--export", "2"], capsys)
    assert rc == 0, err
    comp = re.search(r"^operators-compile: cold=([\d.]+) warm=([\d.]+)$", out, re.M)
    gen = re.search(r"^operators-generation: P=4 ask_s=([\d.]+) of_bw=([\d.]+) vs_peft=([\d.]+)$", out, re.M)
    assert comp and gen, out
    # cold starts from an empty cache; the warm process found ask and tell stored by the cold one
    assert "ask stored before: cold False, warm True; tell: False, True" in out
    assert float(gen.group(1)) > 0
    row = next(ln for ln in out.splitlines() if ln.startswith("| 4 (4) | 1 |"))
    assert row.count("|") == 14


@pytest.mark.slow
def test_bench_gpu_tiny_on_cpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("GENOME_JAX_COMPILE_CACHE", str(tmp_path / "cc"))
    rc, out, err = run_cli(["bench", "gpu", "--repeats", "1", "--json_out", str(tmp_path / "g.json")], capsys)
    assert rc == 0, err
    assert "tiny shapes" in out and "[pallas_interpret]" in out
    ops = re.search(r"^gpu-operators: P=8 crossover_s=([\d.]+) crossover_of_bw=([\d.]+) generation_s=([\d.]+) "
                    r"generation_of_bw=([\d.]+) bw_gbs=([\d.]+)$", out, re.M)
    sc = re.search(r"^gpu-scorer: P=4 population_tok_s=([\d.]+) base_tok_s=([\d.]+) ratio=([\d.]+) "
                   r"mfu_population=nan mfu_base=nan$", out, re.M)  # no bf16 peak is known for a CPU
    assert ops and sc, out
    assert all(float(x) > 0 for x in ops.groups()) and all(float(x) > 0 for x in sc.groups())
