"""`genome fetch-model NAME [--cache DIR]`: download + convert + verify the embedded model; prints its folder."""
from __future__ import annotations

import argparse
import json

from genome_jax.model_store import MODELS, fetch_model, read_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default="smollm2-135m", choices=sorted(MODELS),
                        help="model to fetch (default: smollm2-135m)")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="cache root (default: $GENOME_JAX_CACHE or ~/.cache/genome-jax); "
                             "the model goes to DIR/models/NAME")
    parser.add_argument("--force", action="store_true", help="rebuild even if a verified copy is cached")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the path")


def run(args: argparse.Namespace) -> int:
    path = fetch_model(args.name, args.cache, force=args.force)
    if args.json:
        print(json.dumps({"path": str(path), **read_manifest(path)}, indent=2))
    else:
        print(path)
    return 0
