"""`genome bench NAME [options]`: the benchmarks. Each lives in `scripts/bench_<name>.py` with
`add_arguments(parser)` and `run(args) -> int`, imported only when asked for (so `genome bench scale` never pays for
another benchmark's imports). Every benchmark prints ratios against a baseline measured in the same run."""
from __future__ import annotations

import argparse
import importlib

from genome_jax.errors import UserError

# name -> one-line help (the module is scripts.bench_<name>)
BENCHMARKS: dict[str, str] = {
    "operators": "a generation as `genome run` runs it vs the PEFT merge loop, bandwidth, compile cold/warm",
    "eval": "vLLM scoring: weight swap vs multi-LoRA",
    "trainer": "LoRA expert training steps (optax)",
    "scorer": "the JAX scorer vs vLLM",
    "scale": "operators vs device count (sharded population) and scoring vs number of vLLM engines",
    "quality": "does evolution beat the best expert and the merges on unseen tasks? baselines, seeds, zero-shot",
    "gpu": "the GPU path: TIES (Pallas) + a generation at Llama-3-8B LoRA shapes, the JAX population scorer at 1B",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark: " +
                        "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (NAME --help)")


def run(args: argparse.Namespace) -> int:
    module = f"scripts.bench_{args.name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise UserError(f"benchmark '{args.name}' is not available in this build") from None
        raise
    parser = argparse.ArgumentParser(prog=f"genome bench {args.name}", description=BENCHMARKS[args.name])
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(args.options)) or 0)
