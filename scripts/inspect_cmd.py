"""`genome inspect LORA_DIR [--json]`: load a folder of PEFT LoRA adapters as a population and summarise it."""
from __future__ import annotations

import argparse
import json

from genome_jax.population import load_population, population_summary, validate_population


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora_dir", nargs="+", metavar="LORA_DIR",
                        help="a folder of PEFT adapter subfolders, one adapter folder, or several adapter folders")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    source = args.lora_dir[0] if len(args.lora_dir) == 1 else args.lora_dir
    pop = validate_population(load_population(source))
    s = population_summary(pop)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"population: P={s['P']} individuals, base model {s['base_model'] or '(unset)'}")
    print(f"rank: r={s['rank']} (padded); per individual: {', '.join(f'{n}={r}' for n, r in zip(s['names'], s['ranks']))}")
    print(f"target modules: {', '.join(s['target_modules'])} ({s['modules']} module instances)")
    print(f"parameters: {s['params_per_individual']:,} per individual, {s['params']:,} total "
          f"({_human_bytes(s['bytes'])} as {s['dtype']})")
    return 0
