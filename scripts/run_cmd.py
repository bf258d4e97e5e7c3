"""`genome run`: GENOME / GENOME+ evolution of LoRA adapters, with checkpoint + resume and reports.

    genome run --tasks mmlu gsm8k arc_c --task_weights 0.4 0.3 0.3 --model_path M --lora_dir D \
        --combine_method ties --population_size 30 --max_iter 50

Every setting (genome_jax/settings.py, grouped in --help) can also come from `--config FILE` (YAML or TOML, the
flag names without dashes as keys); flags given on the command line override the file. Re-running the same command with the same --output_dir resumes from the last complete
generation; `--resume DIR` does the same from the config saved in DIR. Every bad flag or key fails before any work
with one line and exit status 1, leaving the output folder untouched.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from genome_jax import run_lock, settings, stopping
from genome_jax.errors import UserError
from genome_jax.run_config import load_run_config


def _device_count(text: str) -> int:
    """--devices N | all (-1)."""
    if text.strip().lower() == "all":
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of devices or 'all', got '{text}'") from None


# how argparse reads each kind of setting: (type, nargs). Values are checked by genome_jax.run_config, so a flag and
# a config-file key fail with the same message.
_ARGPARSE: dict[str, tuple[Callable, str | None]] = {
    "str": (str, None), "int": (int, None), "float": (float, None), "str_list": (str, "+"),
    "float_list": (float, "+"), "devices": (_device_count, None), "device_list": (str, None)}
_GROUPS = {
    "search": "what is searched, how big, how long",
    "operators": "crossover, mutation, selection and GENOME+ succession",
    "scoring": "how fitness is measured",
    "placement": "where the work runs, never what it computes (a resumed run may change these)",
    "output": "the run folder and what is reported after the search",
}
assert set(_GROUPS) == set(settings.GROUPS)


def _help(s: settings.Setting) -> str:
    choices = f" ({' | '.join(s.choices)})" if s.choices else ""
    default = s.default_text()
    if s.kind == "bool":  # the flag is a switch: off unless given; a config file may set the setting itself
        default = "off" + ("" if s.flag[2:].replace("-", "_") == s.name else
                           f"; config key {s.name}: {str(s.default).lower()}")
    return f"{s.help}{choices} (default: {default})".replace("%", "%%")


def _metavar(s: settings.Setting) -> str:
    if s.name.endswith(("_dir", "_path")):
        return "DIR"
    return {"int": "N", "float": "X", "float_list": "X", "devices": "N|all", "device_list": "LIST"}.get(s.kind, "NAME")


def _add_setting(group, s: settings.Setting) -> None:
    """One setting as a flag. Every default is None, "not given": the config file or RunConfig supplies it."""
    if s.kind == "bool":  # a switch that flips the default; both spellings (dashes, underscores) work
        names = dict.fromkeys([s.flag, "--" + s.flag[2:].replace("-", "_")])
        group.add_argument(*names, dest=s.name, action="store_const", const=not s.default, default=None,
                           help=_help(s))
        return
    typ, nargs = _ARGPARSE[s.kind]
    group.add_argument(s.flag, dest=s.name, type=typ, nargs=nargs, default=None, metavar=_metavar(s), help=_help(s))
    for alias in s.aliases:  # other spellings of the seed and the strategies, hidden from --help
        group.add_argument(f"--{alias}", dest=s.name, type=typ, nargs=nargs, default=None, help=argparse.SUPPRESS)


def _exit_1_error(message: str) -> None:  # bad flag values exit 1 like every other bad input of `genome run`
    sys.stderr.write(f"genome: error: {message}\n")
    sys.exit(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _exit_1_error  # type: ignore[method-assign]
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or TOML file of settings (keys: the flag names without dashes)")
    parser.add_argument("--resume", metavar="DIR", default=None, help="continue the run saved in DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--allow-data-change", "--allow_data_change", dest="allow_data_change", action="store_true",
                        help="resume even though a task file or expert file changed since the run started "
                             "(recorded in result.json)")
    # SUPPRESS: `genome --debug run ...` keeps working (a default here would overwrite the top-level flag)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show Python tracebacks on errors")
    for name, description in _GROUPS.items():
        group = parser.add_argument_group(name, description)
        for s in settings.SETTINGS:
            if s.group == name:
                _add_setting(group, s)


def given_settings(args: argparse.Namespace) -> dict:
    """{setting name: value} of the parsed flags (None: not given; the config file or the default decides)."""
    return {s.name: getattr(args, s.name, None) for s in settings.SETTINGS}


def refuse_if_busy(flags, *, config_file: str | None = None, resume_dir: str | None = None) -> None:
    """Fail at once, before JAX is even imported, when another live run holds the output folder. Flags that do not
    parse are left to `run_loop.prepare` to report."""
    folder = resume_dir
    if folder is None:
        try:
            folder = load_run_config(flags, config_file).resolved_output_dir()
        except UserError:
            return
    run_lock.check_free(folder)


def run(args: argparse.Namespace) -> int:
    """Library errors name settings (`population_size`); scripts.cli spells them as these flags when it reports."""
    flags = given_settings(args)
    refuse_if_busy(flags, config_file=args.config, resume_dir=args.resume)  # one writer per folder
    from scripts import run_loop  # imports JAX (seconds): only after a busy folder was refused at once

    cfg, out_dir = run_loop.prepare(flags, config_file=args.config, resume_dir=args.resume)
    changes = run_loop.check_data(cfg, out_dir, allow_change=args.allow_data_change)

    def progress() -> str:  # for "genome: stopped by SIGTERM after generation N; ..."
        g = run_loop.last_saved_generation(out_dir)
        return "before generation 0 was saved" if g is None else f"after generation {g}"

    with stopping.graceful_stop(progress):  # SIGTERM/SIGINT: finish the save in flight, stop the evaluator, exit
        result = run_loop.run(cfg, out_dir, progress=not args.quiet, data_changes=changes)
    print(run_loop.final_summary(result, out_dir))
    return 0
