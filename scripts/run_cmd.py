"""`genome run`: GENOME / GENOME+ evolution of LoRA adapters, with checkpoint + resume and reports.

    genome run --tasks mmlu gsm8k arc_c --task_weights 0.4 0.3 0.3 --model_path M --lora_dir D \
        --combine_method ties --population_size 30 --max_iter 50

Keys can also come from `--config FILE` (YAML or TOML, same names as the flags); flags given on the command line
override the file. Re-running the same command with the same --output_dir resumes from the last complete
generation; `--resume DIR` does the same from the config saved in DIR. Every bad flag or key fails before any work
with one line and exit status 1, leaving the output folder untouched.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from genome_jax import stopping


def _device_count(text: str) -> int:
    """--devices N | all (-1)."""
    if text.strip().lower() == "all":
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of devices or 'all', got '{text}'") from None


# flag -> (type for argparse, nargs, help). All defaults are None: "not given" (RunConfig supplies the defaults,
# a config file may set them, flags override). Types are checked here; values in genome_jax.run_config.
_FLAGS: list[tuple[str, Callable | None, str | None, str]] = [
    ("tasks", str, "+", "fitness tasks: registered names (mmlu gsm8k arc_c ...), task files, or 'synthetic'"),
    ("task_weights", float, "+", "one weight per task (normalised to sum 1; default equal)"),
    ("test_tasks", str, "+", "tasks reported on the test split at the end; those not in --tasks are unseen tasks"),
    ("model_path", str, None, "base model folder (default: the embedded SmolLM2-135M)"),
    ("lora_dir", str, None, "folder of PEFT LoRA expert folders (the parents)"),
    ("method", str, None, "genome | genome_plus (default genome)"),
    ("combine_method", str, None, "merge method for the initial population (default ties)"),
    ("cross_method", str, None, "merge method for crossover (default ties)"),
    ("population_size", int, None, "individuals per generation (default 10)"),
    ("max_population_size", int, None, "genome_plus: the population may grow up to this size"),
    ("max_iter", int, None, "generations (default 50)"),
    ("cross_rate", float, None, "probability a child is a crossover of two parents (default 0.8)"),
    ("individual_mutation_rate", float, None, "probability a child is mutated (default 0.15)"),
    ("gene_mutation_rate", float, None, "share of a mutated child's weights that get noise (default 0.01)"),
    ("sigma", float, None, "standard deviation of the mutation noise (default 0.01)"),
    ("elite_percent", float, None, "share of the population kept unchanged as elites (default 0.02)"),
    ("early_stop_iter", int, None, "stop after this many generations without improvement (default 0: never)"),
    ("seed", int, None, "PRNG seed (default 42)"),
    ("output_dir", str, None, "run folder (default runs/<method>-<tasks>-s<seed>)"),
    ("n_dev", int, None, "dev samples per task for fitness (default 200)"),
    ("n_test", int, None, "test samples per task for the final report (default all)"),
    ("scoring", str, None, "generate | choice_logprob | loglik (default: each task's own)"),
    ("backend", str, None, "vllm | jax (default vllm)"),
    ("eval_mode", str, None, "vLLM route: swap (W+ΔW into the live engine) | lora (multi-LoRA) | auto (default: per platform)"),
    ("eval_dtype", str, None, "vLLM engine dtype: auto (default: the model's, bf16 for SmolLM2; the swap sums W+ΔW "
                              "in float32, then casts) | float32 (exact ΔW, half the speed on CPU) | bfloat16 | float16"),
    ("endpoints", str, "+", "external OpenAI-compatible vLLM servers (http://host:port ...)"),
    ("ensemble_k", int, None, "report ensembles of the top k = 1..K individuals (default 5)"),
    # placement: where the work runs, not what it computes (a resumed run may change these)
    ("devices", _device_count, None, "shard the population over N local JAX devices, or 'all' (default 0: unsharded); "
                                     "population sizes must be multiples of N"),
    ("eval_devices", str, None, "vllm: one managed vLLM worker per listed GPU, e.g. 0,1,2,3"),
    ("ray_address", str, None, "vllm: one engine per Ray actor on a Ray cluster: local | auto | ray://host:port"),
    ("ray_actors", int, None, "with --ray_address: number of Ray actors (default one per GPU, or per CPU)"),
]
CONFIG_KEYS = [f[0] for f in _FLAGS] + ["init_merge", "allow_overlap"]


def _exit_1_error(message: str) -> None:  # bad flag values exit 1 like every other bad input of `genome run`
    sys.stderr.write(f"genome: error: {message}\n")
    sys.exit(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _exit_1_error  # type: ignore[method-assign]
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML or TOML file with the same keys")
    parser.add_argument("--resume", metavar="DIR", default=None, help="continue the run saved in DIR")
    for name, typ, nargs, help_ in _FLAGS:
        parser.add_argument(f"--{name}", type=typ, nargs=nargs, default=None, help=help_)
    parser.add_argument("--iters", dest="max_iter", type=int, default=None, help=argparse.SUPPRESS)  # seed spelling
    parser.add_argument("--no-init-merge", "--no_init_merge", dest="init_merge", action="store_const", const=False,
                        default=None, help="start from the experts themselves instead of random pairwise merges")
    parser.add_argument("--allow-overlap", "--allow_overlap", dest="allow_overlap", action="store_const", const=True,
                        default=None, help="run even if an expert's provenance shows it was trained on dev/test items "
                                           "of a --tasks / --test_tasks task (recorded in result.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--allow-data-change", "--allow_data_change", dest="allow_data_change", action="store_true",
                        help="resume even though a task file or expert file changed since the run started "
                             "(recorded in result.json)")
    # SUPPRESS: `genome --debug run ...` keeps working (a default here would overwrite the top-level flag)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show Python tracebacks on errors")


def run(args: argparse.Namespace) -> int:
    from scripts import run_loop

    flags = {k: getattr(args, k, None) for k in CONFIG_KEYS}
    run_loop.refuse_if_busy(flags, config_file=args.config, resume_dir=args.resume)  # one writer per folder
    cfg, out_dir = run_loop.prepare(flags, config_file=args.config, resume_dir=args.resume)
    changes = run_loop.check_data(cfg, out_dir, allow_change=args.allow_data_change)

    def progress() -> str:  # for "genome: stopped by SIGTERM after generation N; ..."
        g = run_loop.last_saved_generation(out_dir)
        return "before generation 0 was saved" if g is None else f"after generation {g}"

    with stopping.graceful_stop(progress):  # SIGTERM/SIGINT: finish the save in flight, stop the evaluator, exit
        result = run_loop.run(cfg, out_dir, progress=not args.quiet, data_changes=changes)
    print(run_loop.final_summary(result, out_dir))
    return 0
