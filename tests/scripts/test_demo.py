"""`genome demo`: the printed table and timings, flag checks, and (slow) the real thing at a tiny size."""
from __future__ import annotations

import json

import pytest

from scripts import cli, demo

RESULT = {
    "method": "genome_plus", "generations": 3,
    "best": {"dev_fitness": 0.41, "test_fitness": 0.355, "test_scores": {"arc_c": 0.355}},
    "best_initial_expert": {"name": "mmlu", "dev_fitness": 0.38, "test_fitness": 0.33, "test_scores": {"arc_c": 0.33}},
    "ensembles": [{"k": 1, "test_fitness": 0.35, "test_scores": {"arc_c": 0.35}},
                  {"k": 2, "test_fitness": 0.362, "test_scores": {"arc_c": 0.362}}],
    "n_test": {"arc_c": 300},
    "timings_s": {"load": 0.5, "evaluator_start": 40.0,
                  "evolution": {"operators": 12.0, "export": 1.0, "scoring": 150.0, "checkpoint": 0.5, "total": 170.0},
                  "final": {"export": 0.5, "scoring": 60.0, "total": 65.0}, "total": 280.0},
}


def test_table_rows_and_percentages():
    table = demo.demo_table(RESULT, "arc_c", None).splitlines()
    assert "dev %" in table[0] and "test %" in table[0]
    assert table[1].split()[-2:] == ["38.0", "33.0"] and "best initial expert (mmlu)" in table[1]
    assert table[2].split()[-2:] == ["41.0", "35.5"] and "evolved best" in table[2]
    assert table[3].split()[-2:] == ["-", "35.0"] and "top 1" in table[3]
    assert table[4].split()[-1] == "36.2"


def test_timing_line_names_every_part():
    line = demo.timing_lines(RESULT, {"model": 0.2, "experts": 0.4, "total": 300.0})
    for part in ("model 0.2s", "experts 0.4s", "evaluator start 40.0s", "evolution (3 generations) 170.0s",
                 "scoring 150.0s", "test split + ensembles 65.0s", "total 300.0s"):
        assert part in line


@pytest.mark.parametrize("argv, message", [
    (["--generations", "0"], "--generations must be at least 1"),
    (["--n_dev", "x"], "invalid int value: 'x'"),
])
def test_bad_demo_flags_exit_1(argv, message, capsys):
    try:
        rc = cli.main(["demo", *argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    """The real demo path (model, cached expert pool, vLLM, GENOME+, test table) at a tiny size."""
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--output_dir", str(out), "--generations", "1", "--population_size", "2",
                   "--max_population_size", "3", "--n_dev", "8", "--n_test", "8", "--ensemble_k", "2", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "GENOME+ evolved best" in printed and "ensemble of top 2" in printed and "time: model" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "genome_plus" and result["n_test"] == {"arc_c": 8}
    assert (out / "best_adapter" / "adapter_model.safetensors").is_file()
