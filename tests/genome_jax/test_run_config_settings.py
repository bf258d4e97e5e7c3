"""The settings table drives RunConfig, config-file keys, validation, what reaches the strategy and the resume
identity: every entry is exercised here (adding a setting without an example below fails the first test)."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import yaml

from genome_jax import settings
from genome_jax.errors import ParamError, UserError
from genome_jax.operators.merge import MergeConfig
from genome_jax.run_config import RunConfig, describe_mismatch, load_run_config
from genome_jax.strategies import SETTINGS as STRATEGY_SETTINGS
from genome_jax.strategies import make_strategy, strategy_params, strategy_settings

REAL = {"tasks": ("arc_c",), "lora_dir": "."}  # a real task needs an expert folder (any folder passes here)

# setting -> (a valid value other than the default, the other settings it needs)
EXAMPLES: dict[str, tuple] = {
    "tasks": (("mmlu", "arc_c"), {"lora_dir": "."}),
    "task_weights": ((0.25, 0.75), {"tasks": ("mmlu", "arc_c"), "lora_dir": "."}),
    "model_path": ("some/model", {}),  # only checked for real tasks
    "lora_dir": (".", {}),
    "method": ("genome_plus", {}),
    "population_size": (6, {}),
    "max_population_size": (12, {"method": "genome_plus"}),
    "n_offspring": (3, {"method": "genome_plus"}),
    "max_iter": (7, {}),
    "early_stop_iter": (3, {}),
    "init_merge": (False, {}),
    "seed": (5, {}),
    "allow_overlap": (True, {}),
    "combine_method": ("linear", {}),
    "combine_density": (0.5, {}),
    "cross_method": ("dare_ties", {}),
    "cross_density": (0.3, {}),
    "cross_rate": (0.6, {}),
    "n_parents": (3, {}),
    "cross_weights": ("fitness", {}),
    "mutation": ("svd", {}),
    "individual_mutation_rate": (0.5, {}),
    "gene_mutation_rate": (0.2, {}),
    "sigma": (0.05, {}),
    "sigma_decay": (0.9, {}),
    "elite_percent": (0.2, {}),
    "selection": ("tournament", {}),
    "tournament_size": (4, {}),
    "truncation_percent": (0.3, {}),
    "rank_pressure": (1.8, {}),
    "survivor_selection": ("rank", {}),
    "inertia": (0.7, {}),
    "cognitive": (0.2, {}),
    "social": (0.6, {}),
    "repel": (0.05, {}),
    "step_size": (0.5, {}),
    "step_size_decay": (0.9, {}),
    "n_dev": (50, {}),
    "scoring": ("loglik", {}),
    "backend": ("jax", {}),
    "eval_mode": ("lora", {}),
    "eval_dtype": ("float32", {}),
    "endpoints": (("http://host:8000",), {}),
    "devices": (2, {}),
    "eval_devices": ("0,1", {}),
    "ray_address": ("auto", {}),
    "ray_actors": (2, {"ray_address": "auto"}),
    "output_dir": ("runs/x", {}),
    "test_tasks": (("mmlu",), REAL),
    "n_test": (20, {}),
    "ensemble_k": (3, {}),
}

# setting -> (a bad value, the other settings it needs) for the settings without choices or a range in the table
BAD_CUSTOM: dict[str, tuple] = {
    "tasks": (("synthetic", "mmlu"), {}),
    "task_weights": ((-1.0, 1.0), {"tasks": ("mmlu", "arc_c"), "lora_dir": "."}),
    "model_path": ("/nonexistent/model", REAL),
    "lora_dir": ("/nonexistent/experts", {}),
    "endpoints": (("localhost:8000",), {}),
    "devices": (-2, {}),
    "eval_devices": ("0,,1", {}),
    "ray_address": ("http://head:1", {}),
    "test_tasks": (("synthetic",), REAL),
}
NO_BAD_VALUE = {"output_dir", "init_merge", "allow_overlap"}  # any string / either bool is valid


def bad_value(s: settings.Setting):
    """(value, context) that fails the setting's own check: from the table (choices, range) or BAD_CUSTOM."""
    if s.name in BAD_CUSTOM:
        return BAD_CUSTOM[s.name]
    if s.choices is not None:
        return "nope", {}
    if s.kind == "int":
        return int(s.low) - 1, {}
    return (s.low if s.low_open else s.low - 1.0), {}


def bad_cases():
    return [s for s in settings.SETTINGS if s.name not in NO_BAD_VALUE]


def test_every_setting_has_an_example_and_a_bad_value():
    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    assert set(EXAMPLES) == set(names)
    for s in bad_cases():
        assert s.name in BAD_CUSTOM or s.choices is not None or s.low is not None, s.name
    assert {s.group for s in settings.SETTINGS} == set(settings.GROUPS)
    assert [f.name for f in dataclasses.fields(RunConfig)] == names


@pytest.mark.parametrize("s", settings.SETTINGS, ids=lambda s: s.name)
def test_every_setting_round_trips_through_a_config_file(tmp_path, s):
    value, context = EXAMPLES[s.name]
    assert value != s.default
    raw = {"tasks": ["synthetic"], **context, s.name: value}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()}))
    cfg = load_run_config({}, path)
    assert getattr(cfg, s.name) == value
    assert getattr(load_run_config({k: v for k, v in raw.items()}), s.name) == value  # and as library settings


@pytest.mark.parametrize("s", bad_cases(), ids=lambda s: s.name)
def test_a_bad_value_of_each_setting_is_a_param_error_naming_it(s):
    value, context = bad_value(s)
    with pytest.raises(ParamError) as e:
        load_run_config({"tasks": ("synthetic",), **context, s.name: value})
    assert e.value.params[0] == s.name and str(e.value).startswith(s.name), str(e.value)
    assert "--" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, text", [("population_size", "ten"), ("sigma", "high"), ("init_merge", "1"),
                                       ("allow_overlap", "2"), ("tasks", "[1, 2]")])
def test_config_file_values_of_the_wrong_type_name_the_key_and_file(tmp_path, key, text):
    path = tmp_path / "run.yaml"
    path.write_text(f"tasks: [synthetic]\n{key}: {text}\n" if key != "tasks" else f"tasks: {text}\n")
    with pytest.raises(UserError) as e:
        load_run_config({}, path)
    assert f"'{key}' must be" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("alias, value, name, expected", [
    ("combine", "linear", "combine_method", "linear"), ("cross", "slerp", "cross_method", "slerp"),
    ("patience", 4, "early_stop_iter", 4), ("iters", 9, "max_iter", 9), ("max_generations", 9, "max_iter", 9),
    ("no_init_merge", True, "init_merge", False), ("no-init-merge", False, "init_merge", True),
    ("population-size", 6, "population_size", 6),
])
def test_aliases_in_config_files(tmp_path, alias, value, name, expected):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["synthetic"], alias: value}))
    assert getattr(load_run_config({}, path), name) == expected


def test_table_defaults_are_the_strategy_defaults():
    """The table's defaults of strategy settings equal make_strategy's (and MergeConfig's density)."""
    for s in settings.SETTINGS:
        if s.to != "strategy":
            continue
        merge, _, sub = s.target.partition(".")
        assert s.default == (getattr(MergeConfig, sub) if sub else STRATEGY_SETTINGS[merge]), s.name
    # strategy_settings gives exactly make_strategy's keywords (max_iter and early_stop_iter are the loop's)
    cfg = load_run_config({"tasks": ("synthetic",)})
    assert set(strategy_settings(cfg)) == set(STRATEGY_SETTINGS)
    strategy, params = strategy_params(cfg)
    default, default_params = make_strategy("genome")
    assert strategy == default and params.to_dict() == default_params.to_dict()


@pytest.mark.parametrize("s", [s for s in settings.SETTINGS if s.to == "strategy"], ids=lambda s: s.name)
def test_each_strategy_setting_reaches_the_strategy(s):
    value, context = EXAMPLES[s.name]
    # GENOME+ takes every strategy setting (GENOME ignores the swarm's and the growing population's)
    strategy, params = strategy_params(load_run_config({"tasks": ("synthetic",), "method": "genome_plus", **context,
                                                        s.name: value}))
    merge, _, sub = s.target.partition(".")
    if sub:  # a merge's sub-setting: a field of that MergeConfig
        got = getattr(getattr(strategy, merge), sub)
    elif s.name in ("combine_method", "cross_method"):  # the merge of that name, as the strategy reads it
        got = getattr(strategy, merge).method
    elif merge in params.to_dict():  # a plain number: in Params (float32; recorded as its shortest decimal)
        got = params.to_dict()[merge]
    else:
        got = getattr(strategy, merge)
    assert got == value, (s.name, got)


def test_loop_settings_do_not_reach_the_strategy():
    cfg = load_run_config({"tasks": ("synthetic",), "max_iter": 7, "early_stop_iter": 3})
    assert {s.name for s in settings.SETTINGS if s.to == "loop"} == {"max_iter", "early_stop_iter"}
    assert strategy_params(cfg)[0] == strategy_params(load_run_config({"tasks": ("synthetic",)}))[0]


def test_merge_density_makes_a_merge_config_with_the_strategy_normalisation():
    cfg = load_run_config({"tasks": ("synthetic",), "cross_method": "dare_ties", "cross_density": 0.5})
    strategy, _ = strategy_params(cfg)
    assert strategy.cross == MergeConfig(method="dare_ties", density=0.5, normalize="weight")
    # at the default density the name stays, and the strategy reads it as the same merge
    assert strategy_settings(cfg)["combine"] == "ties"
    assert strategy.combine == MergeConfig(method="ties", density=MergeConfig.density, normalize="weight")


def test_resume_may_change_exactly_the_marked_settings():
    assert "max_iter" in settings.RESUME_MAY_CHANGE
    base = load_run_config({"tasks": ("synthetic",)})
    for s in settings.SETTINGS:
        value, context = EXAMPLES[s.name]
        if context:
            continue
        other = dataclasses.replace(base, **{s.name: value})
        assert (describe_mismatch(base, other) == "") == s.resume, s.name


def test_param_error_renders_values_verbatim():
    e = ParamError("{lora_dir} {p}: no such folder", p="/a/{weird}/dir")
    assert str(e) == "lora_dir /a/{weird}/dir: no such folder" and e.params == ("lora_dir",)
    assert e.render(lambda n: f"--{n}") == "--lora_dir /a/{weird}/dir: no such folder"
    assert isinstance(e, ValueError) and isinstance(e, UserError)


def test_float_ranges_are_finite():
    for s in settings.SETTINGS:
        if s.kind == "float":
            with pytest.raises(ParamError):
                settings.check_value(s, math.nan)


# ------------------------------------------------------------------------ the `genome run` command line
def _argv(name: str, value) -> list[str]:
    s = settings.BY_NAME[name]
    if s.kind == "bool":
        return [s.flag] if value != s.default else []
    if isinstance(value, tuple):
        return [s.flag, *map(str, value)]
    return [s.flag, str(value)]


def _context_argv(context: dict, name: str) -> list[str]:
    context = {"tasks": ("synthetic",), **context} if name != "tasks" else context
    return [a for k, v in context.items() for a in _argv(k, v)]


def _parse(argv: list[str]):
    import argparse

    from scripts import run_cmd

    parser = argparse.ArgumentParser()
    run_cmd.add_arguments(parser)
    return load_run_config(run_cmd.given_settings(parser.parse_args(argv)))


@pytest.mark.parametrize("s", settings.SETTINGS, ids=lambda s: s.name)
def test_every_setting_round_trips_through_its_flag(s):
    value, context = EXAMPLES[s.name]
    assert getattr(_parse(_context_argv(context, s.name) + _argv(s.name, value)), s.name) == value


@pytest.mark.parametrize("flag, value, name, expected", [
    ("--iters", "9", "max_iter", 9), ("--max_generations", "9", "max_iter", 9), ("--patience", "4", "early_stop_iter", 4),
    ("--combine", "linear", "combine_method", "linear"), ("--cross", "slerp", "cross_method", "slerp"),
    ("--no_init_merge", None, "init_merge", False), ("--allow_overlap", None, "allow_overlap", True),
])
def test_flag_aliases(flag, value, name, expected):
    cfg = _parse(["--tasks", "synthetic", flag] + ([value] if value else []))
    assert getattr(cfg, name) == expected


def test_help_groups_every_setting_with_its_default(capsys):
    from scripts import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and line.startswith("  -"):
            current.append(line)
        elif current is not None and current and line.strip():
            current[-1] += " " + line
    assert set(settings.GROUPS) <= set(sections)
    for s in settings.SETTINGS:
        entry = next((x for x in sections[s.group] if x.split()[0].rstrip(",") == s.flag), None)
        assert entry is not None, (s.name, s.group)
        default = "off" if s.kind == "bool" else s.default_text()
        squeeze = "".join(entry.split())  # help lines wrap at spaces and hyphens
        assert f"(default:{''.join(default.split())}" in squeeze, (s.name, entry)
        for choice in s.choices or ():
            assert choice in squeeze, (s.name, choice)
    for name in ("inertia", "cognitive", "social", "repel", "cross_density", "selection", "survivor_selection"):
        assert f"--{name}" in text


@pytest.mark.parametrize("s", bad_cases(), ids=lambda s: s.name)
def test_a_bad_value_of_each_setting_is_one_line_naming_its_flag(tmp_path, capsys, s):
    from scripts import cli

    value, context = bad_value(s)
    out = tmp_path / "out"
    argv = ["run", *_context_argv(context, s.name), *_argv(s.name, value), "--output_dir", str(out)]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.count("\n") == 1 and re.match(f"genome: error: {s.flag}[ :]", err), err
    assert not out.exists()
