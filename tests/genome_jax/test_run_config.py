"""RunConfig: defaults < saved < config file < flags, type checks, validation messages."""
from __future__ import annotations

import json

import pytest

from genome_jax.errors import ParamError, UserError
from genome_jax.run_config import (
    RunConfig,
    describe_mismatch,
    load_run_config,
    run_config_from_dict,
    save_run_config,
)


def test_defaults_follow_the_seed_scripts():
    cfg = load_run_config({"tasks": ["synthetic"]})
    assert (cfg.population_size, cfg.max_iter, cfg.cross_rate, cfg.individual_mutation_rate) == (10, 50, 0.8, 0.15)
    assert (cfg.gene_mutation_rate, cfg.sigma, cfg.elite_percent, cfg.seed) == (0.01, 0.01, 0.02, 42)
    assert (cfg.method, cfg.combine_method, cfg.cross_method, cfg.init_merge) == ("genome", "ties", "ties", True)


def test_weights_are_normalised_and_default_to_equal(tmp_path):
    cfg = RunConfig(tasks=("a", "b", "c"), task_weights=(2.0, 1.0, 1.0))
    assert cfg.weights == pytest.approx((0.5, 0.25, 0.25))
    assert RunConfig(tasks=("a", "b")).weights == (0.5, 0.5)


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "tasks: [synthetic]\npopulation_size: 6\nsigma: 0.5\nno_init_merge: true\nmethod: genome_plus\n"),
    (".toml", 'tasks = ["synthetic"]\npopulation_size = 6\nsigma = 0.5\nno_init_merge = true\nmethod = "genome_plus"\n'),
])
def test_config_file_then_flags_override(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = load_run_config({"population_size": 8, "seed": None}, path)
    assert cfg.population_size == 8  # the flag wins
    assert cfg.sigma == 0.5 and cfg.init_merge is False and cfg.method == "genome_plus"
    assert cfg.seed == 42  # None means "flag not given"


def test_saved_config_roundtrip_and_identity(tmp_path):
    cfg = load_run_config({"tasks": ["synthetic"], "population_size": 4, "max_iter": 3})
    save_run_config(cfg, tmp_path / "run_config.json")
    back = run_config_from_dict(json.loads((tmp_path / "run_config.json").read_text()), "saved")
    assert back == cfg
    assert describe_mismatch(cfg, back) == ""
    other = load_run_config({"tasks": ["synthetic"], "population_size": 5, "max_iter": 3})
    assert "population_size: 4 -> 5" in describe_mismatch(cfg, other)
    # what is only reported after the search may change on resume
    later = load_run_config({"tasks": ["synthetic"], "population_size": 4, "max_iter": 3, "ensemble_k": 2})
    assert describe_mismatch(cfg, later) == ""
    # so may the evaluator's numerics: the result cache keys them apart (evaluators/backends/cache.py)
    exact = load_run_config({"tasks": ["synthetic"], "population_size": 4, "max_iter": 3, "eval_dtype": "float32"})
    assert describe_mismatch(cfg, exact) == "" and exact.eval_dtype == "float32" and cfg.eval_dtype == "auto"


@pytest.mark.parametrize("flags, message", [
    ({}, "tasks is required"),
    ({"tasks": ["synthetic"], "population_size": 1}, "population_size must be at least 2, got 1"),
    ({"tasks": ["synthetic"], "cross_rate": 1.5}, "cross_rate must be in [0, 1], got 1.5"),
    ({"tasks": ["synthetic"], "gene_mutation_rate": -0.1}, "gene_mutation_rate must be in [0, 1]"),
    ({"tasks": ["synthetic"], "elite_percent": float("nan")}, "elite_percent must be in [0, 1]"),
    ({"tasks": ["synthetic"], "elite_percent": 1.0}, "elite_percent 1.0 keeps every one of the 10 individuals"),
    ({"tasks": ["synthetic"], "method": "cmaes"}, "method must be one of genome, genome_plus, got 'cmaes'"),
    ({"tasks": ["synthetic"], "task_weights": [0.5, 0.5]}, "task_weights has 2 value(s) but tasks has 1"),
    ({"tasks": ["synthetic", "mmlu"]}, "tasks synthetic is a test problem and cannot be mixed"),
    ({"tasks": ["synthetic"], "max_iter": 0}, "max_iter must be at least 1"),
    ({"tasks": ["synthetic"], "n_dev": 0}, "n_dev must be at least 1"),
    ({"tasks": ["synthetic"], "backend": "tpu"}, "backend must be one of vllm, jax"),
    ({"tasks": ["synthetic"], "scoring": "vibes"}, "scoring must be one of"),
    ({"tasks": ["synthetic"], "eval_dtype": "int8"}, "eval_dtype must be one of auto, bfloat16, float16, float32"),
    ({"tasks": ["synthetic"], "max_population_size": 20}, "max_population_size only applies to method genome_plus"),
    ({"tasks": ["synthetic"], "n_offspring": 3}, "n_offspring only applies to method genome_plus"),
    ({"tasks": ["synthetic"], "method": "genome_plus", "max_population_size": 4, "population_size": 6},
     "max_population_size (4) must be >= population_size (6)"),
    ({"tasks": ["synthetic"], "cross_method": "dare"}, "cross_method must be one of linear, task_arithmetic, ties"),
    ({"tasks": ["synthetic"], "cross_density": 0.0}, "cross_density must be in (0, 1], got 0.0"),
    ({"tasks": ["synthetic"], "inertia": -0.1}, "inertia must be finite and >= 0, got -0.1"),
    ({"tasks": ["synthetic"], "selection": "best"}, "selection must be one of roulette, tournament, truncation, rank"),
    ({"tasks": ["mmlu"]}, "lora_dir is required"),
    ({"tasks": ["mmlu"], "lora_dir": "/nonexistent/dir"}, "lora_dir /nonexistent/dir: no such folder"),
    ({"tasks": ["synthetic"], "endpoints": ["localhost:8000"]}, "endpoints: 'localhost:8000' is not an http(s):// URL"),
])
def test_bad_values_fail_with_one_line_naming_the_parameter(flags, message):
    """Library messages name the setting, never a flag (the CLI spells it: tests/scripts/test_run_cli.py)."""
    with pytest.raises(ParamError) as e:
        load_run_config(flags)
    param = message.split(" ")[0].rstrip(":")
    assert str(e.value).startswith(param) and message in str(e.value) and e.value.params[0] == param
    assert "\n" not in str(e.value) and "--" not in str(e.value)
    # the CLI's spelling is a rendering of the same error: every parameter named, the culprit first
    rendered = e.value.render(lambda name: f"<{name}>")
    assert rendered.startswith(f"<{e.value.params[0]}>") and all(f"<{p}>" in rendered for p in e.value.params)


@pytest.mark.parametrize("text, message", [
    ("tasks: [synthetic]\npopulation_sise: 4\n", "unknown key 'population_sise' (did you mean 'population_size'?)"),
    ("tasks: [synthetic]\npopulation_size: ten\n", "'population_size' must be an integer, got str 'ten'"),
    ("tasks: [synthetic]\npopulation_size: true\n", "'population_size' must be an integer"),
    ("tasks: [synthetic]\nsigma: [1]\n", "'sigma' must be a number"),
    ("tasks: [synthetic]\ninit_merge: 1\n", "'init_merge' must be true or false"),
    ("tasks: [1, 2]\n", "'tasks' must be a list of strings"),
    ("- just\n- a list\n", "expected a mapping"),
    ("tasks: [synthetic\n", "cannot parse"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_run_config({}, path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_config_format(tmp_path):
    path = tmp_path / "run.ini"
    path.write_text("[x]\n")
    with pytest.raises(UserError, match="unknown format '.ini'"):
        load_run_config({}, path)


def test_default_output_dir_is_deterministic():
    a = load_run_config({"tasks": ["synthetic"], "seed": 3})
    assert str(a.resolved_output_dir()) == "runs/genome-synthetic-s3"
    assert a.resolved_output_dir() == load_run_config({"tasks": ["synthetic"], "seed": 3}).resolved_output_dir()
