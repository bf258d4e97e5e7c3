"""`genome run` flag validation: every bad flag, key or combination fails before any work, with exit status 1,
one line on stderr (no traceback) and nothing written to the output folder."""
from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli


@pytest.fixture
def yaml_config(tmp_path):
    def make(text: str):
        p = tmp_path / "cfg.yaml"
        p.write_text(text)
        return str(p)

    return make


CASES = [
    # (id, extra argv, substring of the one-line message)
    ("weights-vs-tasks", ["--tasks", "synthetic", "--task_weights", "0.5", "0.5"],
     "--task_weights has 2 value(s) but --tasks has 1"),
    ("weights-vs-real-tasks", ["--tasks", "mmlu", "arc_c", "--task_weights", "1", "--lora_dir", "{tmp}"],
     "--task_weights has 1 value(s) but --tasks has 2"),
    ("negative-weight", ["--tasks", "mmlu", "arc_c", "--task_weights", "1", "-1", "--lora_dir", "{tmp}"],
     "--task_weights must be finite and >= 0"),
    ("population-1", ["--tasks", "synthetic", "--population_size", "1"], "--population_size must be at least 2"),
    ("cross-rate", ["--tasks", "synthetic", "--cross_rate", "1.5"], "--cross_rate must be in [0, 1], got 1.5"),
    ("ind-rate", ["--tasks", "synthetic", "--individual_mutation_rate", "-0.1"],
     "--individual_mutation_rate must be in [0, 1]"),
    ("gene-rate", ["--tasks", "synthetic", "--gene_mutation_rate", "2"], "--gene_mutation_rate must be in [0, 1]"),
    ("elite", ["--tasks", "synthetic", "--elite_percent", "1.01"], "--elite_percent must be in [0, 1]"),
    ("elite-all", ["--tasks", "synthetic", "--elite_percent", "1.0"], "--elite_percent"),
    ("sigma", ["--tasks", "synthetic", "--sigma", "-1"], "--sigma must be finite and >= 0"),
    ("method", ["--tasks", "synthetic", "--method", "cmaes"], "--method must be one of genome, genome_plus"),
    ("cross-method", ["--tasks", "synthetic", "--cross_method", "average"], "--cross_method must be one of linear,"),
    ("combine-method", ["--tasks", "synthetic", "--combine_method", "x"], "--combine_method must be one of"),
    ("eval-mode", ["--tasks", "synthetic", "--eval_mode", "fast"], "--eval_mode must be one of auto, swap, lora"),
    ("unknown-task", ["--tasks", "mmlu", "nosuchtask", "--lora_dir", "{tmp}"], "unknown task 'nosuchtask'"),
    ("unknown-test-task", ["--tasks", "mmlu", "--test_tasks", "nosuch", "--lora_dir", "{tmp}"],
     "unknown task 'nosuch'"),
    ("scoring-mode", ["--tasks", "gsm8k", "--scoring", "choice_logprob", "--lora_dir", "{tmp}"],
     "has no scoring mode 'choice_logprob'"),
    ("no-lora-dir", ["--tasks", "mmlu"], "--lora_dir is required"),
    ("missing-lora-dir", ["--tasks", "mmlu", "--lora_dir", "{tmp}/nope"], "no such folder"),
    ("empty-lora-dir", ["--tasks", "mmlu", "--lora_dir", "{tmp}"], "no PEFT adapter folders found"),
    ("bad-int", ["--tasks", "synthetic", "--population_size", "ten"], "invalid int value: 'ten'"),
    ("bad-float", ["--tasks", "synthetic", "--sigma", "big"], "invalid float value: 'big'"),
    ("max-iter", ["--tasks", "synthetic", "--max_iter", "0"], "--max_iter must be at least 1"),
    ("n-dev", ["--tasks", "synthetic", "--n_dev", "0"], "--n_dev must be at least 1"),
    ("ensemble-k", ["--tasks", "synthetic", "--ensemble_k", "0"], "--ensemble_k must be at least 1"),
    ("backend", ["--tasks", "synthetic", "--backend", "tpu"], "--backend must be one of vllm, jax"),
    ("endpoint-url", ["--tasks", "synthetic", "--endpoints", "host:8000"], "is not an http(s):// URL"),
    ("no-init-merge-too-many", ["--tasks", "synthetic", "--no-init-merge", "--population_size", "3"],
     "--no-init-merge keeps all 4 experts"),
    ("max-pop-genome", ["--tasks", "synthetic", "--max_population_size", "20"], "only applies to --method genome_plus"),
    ("config-missing", ["--config", "{tmp}/nope.yaml"], "no such file"),
    ("config-unknown-key", ["--config", "@tasks: [synthetic]\npopulaton_size: 4\n"], "unknown key 'populaton_size'"),
    ("config-wrong-type", ["--config", "@tasks: [synthetic]\nsigma: high\n"], "'sigma' must be a number"),
    ("config-bad-yaml", ["--config", "@tasks: [synthetic\n"], "cannot parse"),
    ("config-bad-rate", ["--config", "@tasks: [synthetic]\ncross_rate: 3\n"], "--cross_rate must be in [0, 1]"),
    ("resume-nothing", ["--resume", "{tmp}"], "no run_config.json there"),
]


@pytest.mark.parametrize("case_id, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_flags_exit_1_with_one_line_and_write_nothing(tmp_path, capsys, yaml_config, case_id, argv, message):
    out = tmp_path / "out"
    args = []
    for a in argv:
        if a.startswith("@"):
            a = yaml_config(a[1:])
        args.append(a.replace("{tmp}", str(tmp_path)))
    if "--resume" not in args:
        args += ["--output_dir", str(out)]
    rc, stdout, stderr = run_cli(["run", *args], capsys)
    assert rc == 1, (rc, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("genome: error: "), stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()


def test_flags_override_the_config_file(tmp_path, capsys, yaml_config):
    # the file's bad rate is overridden by a good flag: the run gets past validation (checked via prepare)
    from scripts import run_loop

    path = yaml_config("tasks: [synthetic]\ncross_rate: 3\npopulation_size: 6\n")
    cfg, out_dir = run_loop.prepare({"cross_rate": 0.5, "output_dir": str(tmp_path / "o")}, config_file=path)
    assert cfg.cross_rate == 0.5 and cfg.population_size == 6
    assert not out_dir.exists()


def test_different_config_in_existing_run_folder_is_refused(tmp_path, capsys):
    from genome_jax.run_config import load_run_config, save_run_config

    out = tmp_path / "run"
    out.mkdir()
    save_run_config(load_run_config({"tasks": ["synthetic"], "population_size": 4}), out / "run_config.json")
    before = sorted(p.name for p in out.iterdir())
    rc, _, stderr = run_cli(["run", "--tasks", "synthetic", "--population_size", "6", "--output_dir", str(out)], capsys)
    assert rc == 1
    assert "holds a run with a different config (population_size: 4 -> 6)" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "run_config.json").read_text())["population_size"] == 4


def test_foreign_non_empty_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, stderr = run_cli(["run", "--tasks", "synthetic", "--output_dir", str(out)], capsys)
    assert rc == 1 and "holds no genome run" in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_real_command_line(tmp_path, cli):
    """The same through the real `python -m scripts.cli` process: exit 1, one line, no traceback."""
    out = tmp_path / "o"
    p = cli("run", "--tasks", "synthetic", "--population_size", "1", "--output_dir", str(out), timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip() == "genome: error: --population_size must be at least 2, got 1"
    assert not out.exists()


def test_operator_settings_reach_the_strategy_of_a_run(tmp_path, capsys):
    """Hyperparameters given as flags are the ones the run's strategy used: the params recorded with its
    checkpoints (the identity a resume is checked against) and the saved run config."""
    out = tmp_path / "plus"
    argv = ["run", "--tasks", "synthetic", "--method", "genome_plus", "--population_size", "4",
            "--max_population_size", "6", "--max_iter", "2", "--cross_method", "ties", "--cross_density", "0.5",
            "--combine_method", "linear", "--inertia", "0.7", "--cognitive", "0.2", "--social", "0.6",
            "--repel", "0.05", "--step_size", "0.5", "--step_size_decay", "0.9", "--selection", "tournament",
            "--tournament_size", "2", "--survivor_selection", "rank", "--sigma_decay", "0.8",
            "--cross_weights", "equal", "--quiet", "--output_dir", str(out)]
    rc, _, stderr = run_cli(argv, capsys)
    assert rc == 0, stderr
    identity = json.loads((out / "checkpoints" / "run_config.json").read_text())
    params, strategy = identity["params"], identity["strategy"]  # the numbers (Params) and the structure
    assert (params["inertia"], params["cognitive"], params["social"], params["repel"]) == (0.7, 0.2, 0.6, 0.05)
    assert (params["step_size"], params["step_size_decay"], params["sigma_decay"]) == (0.5, 0.9, 0.8)
    assert (strategy["selection"], strategy["tournament_size"], strategy["survivor_selection"]) == \
        ("tournament", 2, "rank")
    assert strategy["cross_weights"] == "equal" and strategy["combine"]["__merge__"]["method"] == "linear"
    assert strategy["cross"]["__merge__"]["method"] == "ties" and strategy["cross"]["__merge__"]["density"] == 0.5
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["inertia"], saved["selection"], saved["cross_density"]) == (0.7, "tournament", 0.5)
