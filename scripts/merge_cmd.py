"""`genome merge`: merge PEFT LoRA adapters into one PEFT folder, like mergekit does for models.

    genome merge --method ties --density 0.2 --weights 0.6 0.4 [--space factors|delta] --out OUT DIR1 DIR2 ...

The adapters are read as a population (scales folded into B, ranks zero-padded), merged by
genome_jax.operators.merge.crossover as one child of all of them, and written atomically as a PEFT folder
(lora_alpha = r, so the stored B @ A is the update). Wiring only: the math lives in genome_jax.operators.merge.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from genome_jax.errors import UserError
from genome_jax.operators.merge import METHODS, MergeConfig, SPACES, crossover
from genome_jax.population import Population, export_adapter, load_population


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", metavar="DIR", help="PEFT LoRA adapter folders (same base model)")
    parser.add_argument("--out", required=True, help="output PEFT folder (replaced if it is an adapter folder)")
    parser.add_argument("--method", choices=METHODS, default="ties")
    parser.add_argument("--weights", type=float, nargs="+", metavar="W",
                        help="one weight per adapter (default: equal weights summing to 1)")
    parser.add_argument("--density", type=float, default=0.2, help="fraction kept (ties, dare_*, breadcrumbs, "
                        "magnitude_prune); default 0.2")
    parser.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total")
    parser.add_argument("--normalize", choices=("weight", "count", "none"), default="weight",
                        help="weight (default): mergekit normalize=true, divide by the agreeing (ties-type) or all "
                             "weights, so merging an adapter with itself returns it; count: PEFT (divide ties-type "
                             "merges by the number of agreeing adapters, leave sums); none: mergekit normalize=false")
    parser.add_argument("--no-rescale", action="store_true", help="DARE: do not divide kept entries by density")
    parser.add_argument("--gamma", type=float, default=0.01, help="breadcrumbs: fraction of largest entries dropped")
    parser.add_argument("--t", type=float, default=None, help="slerp position (default: w2 / (w1 + w2))")
    parser.add_argument("--alpha", type=float, default=0.5, help="blx_alpha: interval extension")
    parser.add_argument("--lambda", dest="scale", type=float, default=1.0, help="task_arithmetic scale")
    parser.add_argument("--space", choices=SPACES, default="factors",
                        help="factors: merge A and B separately; delta: merge B@A and re-factor at rank r")
    parser.add_argument("--svd", choices=("randomized", "exact"), default="exact",
                        help="delta space, elementwise methods: truncated SVD algorithm (default exact)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (dare_*, blx_alpha, uniform, randomized SVD)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored tensor dtype")


def run(args: argparse.Namespace) -> int:
    k = len(args.adapters)
    if k < 2:
        raise UserError(f"merge needs at least 2 adapter folders, got {k}")
    if args.weights is None:
        weights = [1.0 / k] * k
    elif len(args.weights) != k:
        raise UserError(f"--weights: {len(args.weights)} values given for {k} adapters")
    else:
        weights = list(args.weights)
    if args.method == "slerp" and k != 2:
        raise UserError(f"--method slerp merges exactly 2 adapters, got {k}")
    config = MergeConfig(method=args.method, density=args.density, majority_sign_method=args.majority_sign_method,
                         normalize=args.normalize, rescale=not args.no_rescale, gamma=args.gamma, t=args.t,
                         alpha=args.alpha, scale=args.scale, space=args.space, svd=args.svd)
    pop = load_population(list(args.adapters))
    idx = jnp.arange(k, dtype=jnp.int32)[None, :]
    w = jnp.asarray([weights], jnp.float32)
    children = crossover(jax.random.key(args.seed), pop.factors, idx, w, config=config)
    child = Population(factors=children, meta=dataclasses.replace(pop.meta, names=("merged",)))
    if not all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(children)):
        raise UserError(f"merge produced non-finite weights (method {args.method}, weights {weights})")
    out = export_adapter(child, 0, args.out, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None)
    cfg = json.loads((out / "adapter_config.json").read_text())
    print(f"merged {k} adapters with {args.method} ({args.space} space, weights {weights}) -> {out} "
          f"(r={cfg['r']}, {len(pop.factors)} modules, target_modules {','.join(cfg['target_modules'])})")
    return 0
