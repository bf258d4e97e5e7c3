"""`genome train-experts`: fine-tune one LoRA expert per task with optax (wiring: this module turns task items into
training examples; the math lives in genome_jax.models.trainer, which knows nothing about tasks).

    genome train-experts --model_path M --out DIR --experts csqa=commonsense_qa:test[200:] boolq=boolq:test[200:] \\
        --steps 60 --lr 1e-3

writes DIR/<name>/ (PEFT folders that peft and vLLM load, each with expert.json: training slice and held-out slice,
and genome_provenance.json: the task file, split and item hashes it was trained on) and DIR/train_log.json (config, loss curve per expert, tokens/s). An example is the task's loglik context followed by
the gold option's text (" {option}"), with the loss on the option's tokens: exactly the log-likelihood that
`--scoring loglik` compares across options; `--loss options` trains on that comparison itself (a softmax over every
option's log-likelihood, each item packed whole). `genome train-experts --demo` (or `--pool quality`) builds or reuses a
cached pool and prints its folder. Held-out accuracies: `genome eval --scoring loglik` on each expert's held-out
slice (docs/EXPERTS.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from evaluators import provenance
from evaluators.tasks import get_task
from genome_jax import stopping
from genome_jax.errors import UserError
from genome_jax.model_store import default_model_path
from genome_jax.models import trainer
from genome_jax.models.trainer import DEMO_CONFIG as D

EXAMPLE_FORMAT = "loglik-continuation-v1"  # enters the pool's recipe hash: change it when the example text changes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", default=None, help="HF Llama folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--out", default=None, help="output folder for the adapters (required unless --demo/--pool)")
    p.add_argument("--experts", nargs="+", default=None, metavar="NAME=TASK[:split[start:stop]]",
                   help="one expert per entry: a registered task name or a task .json file; split dev|test "
                        "(default test), optionally sliced: boolq=boolq:test[200:] trains on test items 200.. and "
                        "holds out test[:200]")
    p.add_argument("--demo", action="store_true", help="build or reuse the demo's cached pool, print its path")
    p.add_argument("--pool", choices=sorted(POOLS), default=None,
                   help="build or reuse a named cached pool (demo: 3 experts, <= 10 min; quality: 6 candidate sources; smoke: 2 experts x 3 steps, for plumbing tests)")
    p.add_argument("--rank", type=int, default=D.rank)
    p.add_argument("--alpha", type=float, default=D.alpha, help="LoRA alpha while training (scale alpha/rank)")
    p.add_argument("--targets", nargs="+", default=list(D.targets), help="target modules (short names)")
    p.add_argument("--steps", type=int, default=D.steps)
    p.add_argument("--lr", type=float, default=D.lr, help="peak learning rate (warmup then cosine)")
    p.add_argument("--warmup_steps", type=int, default=D.warmup_steps)
    p.add_argument("--weight_decay", type=float, default=D.weight_decay)
    p.add_argument("--batch_rows", type=int, default=D.batch_rows, help="packed rows per step")
    p.add_argument("--seq_len", type=int, default=D.seq_len, help="tokens per packed row (longer examples skipped)")
    p.add_argument("--loss", choices=trainer.LOSSES, default=D.loss,
                   help="choice (default): cross-entropy of the gold option's tokens; options: softmax over the "
                        "options' summed log-likelihoods, the comparison loglik scoring makes")
    p.add_argument("--ce_weight", type=float, default=D.ce_weight,
                   help="options loss: add this x the gold tokens' cross-entropy")
    p.add_argument("--option_score", choices=trainer.OPTION_SCORES, default=D.option_score,
                   help="options loss: an option's score is its summed log-likelihood (acc) or per token (mean)")
    p.add_argument("--max_targets", type=int, default=D.max_targets, help="loss tokens per packed row")
    p.add_argument("--max_options", type=int, default=D.max_options, help="options loss: option sequences per step")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--remat", action="store_true", help="recompute layers in the backward pass (less memory)")
    p.add_argument("--no_progress", action="store_true")


# --------------------------------------------------------------------------------------------- examples
def loglik_choice_items(task: Any, items: Sequence[dict]) -> list[tuple[list[tuple[str, str]], int]]:
    """([(context, option continuation) for every option], gold index) per item, exactly as the task's loglik mode
    scores them: its loglik_requests, flattened in label order (one request with every option for most tasks, one
    per option for WinoGrande's partial scoring); the gold index is the answer label's position."""
    if "loglik" not in getattr(task, "modes", ()):
        raise UserError(f"task '{task.name}' has no loglik mode; train-experts trains on multiple-choice tasks")
    out = []
    for it in items:
        task.check_loglik_item(it)
        labels = list(it["choices"])
        if it.get("answer") not in labels:
            raise UserError(f"{task.name}: item {it.get('id', it.get('_index'))}: answer {it.get('answer')!r} "
                              f"is not one of the choices {labels}")
        out.append(([(r.prompt, o) for r in task.loglik_requests(it) for o in r.options], labels.index(it["answer"])))
    return out


def loglik_pairs(task: Any, items: Sequence[dict]) -> list[tuple[str, str]]:
    """(context, gold continuation) per item: the gold option's pair of loglik_choice_items."""
    return [pairs[gold] for pairs, gold in loglik_choice_items(task, items)]


def spec_items(task: Any, spec: Any) -> list[dict]:
    items = task.load(spec.split)
    if spec.start >= len(items):
        raise UserError(f"expert {spec.name}: {spec.label} is empty ({spec.split} has {len(items)} items)")
    return items[spec.start : spec.stop]


def pool_examples(model_path: str, specs: Sequence[Any], cfg: Any) -> list[list[Any]]:
    """One list of trainer.Example per expert spec (the tokenizer of the model folder)."""
    from transformers import AutoTokenizer  # heavy: only training a pool needs the tokenizer

    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if cfg.loss == "options":
        return [trainer.choice_examples(loglik_choice_items(task, spec_items(task, s)), tok, max_len=cfg.seq_len)
                for s, task in zip(specs, _tasks(model_path, specs))]
    return [trainer.continuation_examples(loglik_pairs(task, spec_items(task, s)), tok, max_len=cfg.seq_len)
            for s, task in zip(specs, _tasks(model_path, specs))]


def data_digest(model_path: str, specs: Sequence[Any]) -> str:
    """sha256 of the example format and of every expert's task file (the pool's recipe hash includes it)."""
    h = hashlib.sha256(EXAMPLE_FORMAT.encode())
    for task in _tasks(model_path, specs):
        path = getattr(task, "path", None)
        h.update(Path(path).read_bytes() if path and os.path.isfile(path) else task.name.encode())
    return h.hexdigest()


def write_provenance(out_dir: Path, model_path: str, specs: Sequence[Any]) -> None:
    """out_dir/<name>/genome_provenance.json per expert: exactly the items of its training slice (evaluators.provenance;
    `genome run` refuses a task whose dev/test items are among them). Over-long items that the trainer skipped are
    recorded too: the check errs towards refusing."""
    for spec, task in zip(specs, _tasks(model_path, specs)):
        entry = provenance.make_entry(task.name, getattr(task, "path", None), spec.split, spec_items(task, spec))
        provenance.write_provenance(Path(out_dir) / spec.name, [entry])


def _tasks(model_path: str, specs: Sequence[Any]) -> list[Any]:
    return [get_task(s.task, formatter=model_path) for s in specs]


# --------------------------------------------------------------------------------------------- named pools
_POOLS = {"demo": (trainer.DEMO_EXPERTS, trainer.DEMO_CONFIG),
          "quality": (trainer.QUALITY_EXPERTS, trainer.QUALITY_CONFIG),
          "smoke": (trainer.SMOKE_EXPERTS, trainer.SMOKE_CONFIG)}
POOLS = tuple(_POOLS)


def ensure_pool(model_path: str, name: str = "demo", *, progress: bool = True) -> Path:
    """The named pool's folder (trained on first use, then cached by recipe hash)."""
    specs, cfg = _POOLS[name]
    return trainer.ensure_pool(model_path, specs, lambda: pool_examples(model_path, specs, cfg),
                               data_digest=data_digest(model_path, specs),
                               expert_digests=[data_digest(model_path, [s]) for s in specs], cfg=cfg,
                               annotate=lambda folder: write_provenance(folder, model_path, specs), progress=progress)


# --------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    # SIGTERM/SIGINT: stop cleanly with one line; the pool is written at the end, so a re-run redoes it whole
    with stopping.graceful_stop(lambda: "before the experts were written"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    model_path = args.model_path
    if model_path is None:
        model_path = default_model_path()
    model_path = os.path.expanduser(os.fspath(model_path))
    if not os.path.isdir(model_path):
        raise UserError(f"--model_path {model_path}: not a folder")
    pool = "demo" if args.demo else args.pool
    if pool:
        print(ensure_pool(model_path, pool, progress=not args.no_progress))
        return 0
    if not args.out:
        raise UserError("--out is required (or use --demo / --pool)")
    if not args.experts:
        raise UserError("--experts is required: NAME=TASK[:split[start:stop]] ...")
    specs = [trainer.ExpertSpec.parse(e) for e in args.experts]
    out = Path(args.out).expanduser()
    clash = [s.name for s in specs if (out / s.name).exists() and not (out / s.name / "adapter_config.json").exists()]
    if clash:
        raise UserError(f"{out}: {clash[0]} exists and is not an adapter folder; refusing to overwrite it")
    cfg = trainer.TrainConfig(
        rank=args.rank, alpha=args.alpha, targets=tuple(args.targets), steps=args.steps, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, batch_rows=args.batch_rows,
        seq_len=args.seq_len, seed=args.seed, remat=args.remat, loss=args.loss, ce_weight=args.ce_weight,
        option_score=args.option_score,
        max_targets=args.max_targets, max_options=args.max_options)
    examples = pool_examples(model_path, specs, cfg)  # fails fast on unknown tasks, before the model loads
    result = trainer.train_pool(model_path, specs, examples, out, cfg, progress=not args.no_progress,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    write_provenance(out, model_path, specs)
    summary = {"out": str(out), "experts": [{k: e[k] for k in ("name", "task", "split", "start", "stop", "held_out",
                                                               "examples", "tokens", "seconds")}
                                            | {"final_loss": e["losses"][-1]} for e in result["experts"]]}
    print(json.dumps(summary, indent=2))
    return 0
