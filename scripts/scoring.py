"""Scoring a population during a run: the synthetic TEST PROBLEM's scorer and the LLM scorer (one `Evaluator` over
the vLLM evaluator process or the in-process JAX scorer), plus the phase timer the run loop reports.

Wiring: evaluators never import JAX and genome_jax never imports evaluators; here the JAX scorer
(genome_jax.models.scorer.JaxScorer) is handed to the evaluators' one `Evaluator` as its backend (`jax_evaluator`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from evaluators.backends import Evaluator, make_evaluator, scratch_dir
from evaluators.backends.cache import ResultCache
from evaluators.protocol import ChoiceResponse
from evaluators.tasks import get_task, weighted_fitness
from genome_jax import faults, reporting, synthetic
from genome_jax.models.scorer import InMemoryAdapter, JaxScorer
from genome_jax.population import Population, export_adapter
from genome_jax.run_config import RunConfig
from genome_jax.sharding import replicate

# ------------------------------------------------------------------------------------------------------ timing
class Timer:
    """Accumulated wall time per phase: `with timer("export"): ...`."""

    def __init__(self):
        self.total: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.total[phase] = self.total.get(phase, 0.0) + seconds

    def since(self, before: dict[str, float]) -> dict[str, float]:
        return {k: round(v - before.get(k, 0.0), 4) for k, v in self.total.items() if v - before.get(k, 0.0) > 0}


# ----------------------------------------------------------------------------------------------------- scorers
def _host(tree, idx=None):
    """Device pytree -> numpy pytree (optionally only individuals idx), in one transfer per leaf."""
    if idx is not None:
        idx = np.asarray(idx)
        tree = jax.tree_util.tree_map(lambda a: a[idx], tree)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _digest(tree, i: int) -> str:
    """Content hash of individual i of a numpy pytree (dedupes identical individuals before export; the result-cache
    key of an in-memory child on the JAX backend)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        h.update(np.ascontiguousarray(leaf[i]).tobytes())
    return h.hexdigest()


def _whole(tree):
    """A population sharded over several devices (--devices), replicated so that each device sees whole individuals
    (as an evaluator process does after export): a batched reduction over a split axis would add in another order
    and change the last bits of the fitness. Anything else is returned as is."""
    leaves = jax.tree_util.tree_leaves(tree)
    sh = getattr(leaves[0], "sharding", None) if leaves else None
    if sh is None or len(sh.device_set) < 2 or sh.is_fully_replicated or not hasattr(sh, "mesh"):
        return tree
    return replicate(tree, sh.mesh)


class SyntheticScorer:
    """TEST PROBLEM: fitness = closeness of ΔW to a hidden mix of the experts (genome_jax.synthetic). No LLM."""

    kind = "synthetic"
    cache_hits = 0

    def __init__(self, experts_factors, seed: int):
        self.problem = synthetic.make_problem(experts_factors, seed=seed + 1)
        self._score = synthetic.score

    def dev_fitness(self, factors, idx, meta, timer: Timer, progress: bool) -> list[float]:
        bar = reporting.progress_bar(len(idx), "scoring (synthetic)", disable=not progress)
        with timer("scoring"):  # the whole population at once: one compiled shape for every generation
            full = np.asarray(self._score(self.problem, _whole(factors)))
            out = [float(full[i]) for i in idx]
        faults.point("scored")
        bar.update(len(idx))
        bar.close()
        return out

    def close(self) -> None:
        pass


EVAL_RETRIES = 2  # fresh evaluator workers tried after a crash within one scoring call, before the run stops


def max_lora_rank(rank: int) -> int:
    """vLLM's max_lora_rank for adapters of this rank: the next size it supports, at least 16."""
    return next((a for a in (8, 16, 32, 64, 128, 256, 512) if a >= max(rank, 16)), rank)


def evaluator_kwargs(cfg: RunConfig, rank: int) -> dict[str, Any]:
    """Keyword arguments of `evaluators.backends.make_evaluator` for this run (besides model, cache and progress):
    external --endpoints, one managed worker per --eval_devices GPU, Ray actors at --ray_address, or one managed
    worker. rank: the experts' LoRA rank (vLLM's max_lora_rank is the next size it supports)."""
    kw: dict[str, Any] = {"endpoints": list(cfg.endpoints) or None, "eval_mode": cfg.eval_mode,
                          "max_lora_rank": max_lora_rank(rank)}
    if not cfg.endpoints and cfg.eval_dtype != "auto":  # endpoints run in the servers' own dtype
        kw["dtype"] = cfg.eval_dtype
    if cfg.ray_address is not None:  # Ray replaces a lost actor itself and rescores its individual
        kw.update(ray_address=cfg.ray_address, ray_actors=cfg.ray_actors)
    else:
        # retries: a worker that dies or hangs mid-generation is restarted and the generation rescored
        kw["retries"] = EVAL_RETRIES
        if cfg.eval_devices is not None:
            kw["eval_devices"] = cfg.eval_devices
    return kw


def jax_evaluator(model_path: str, *, cache_dir: str | None = None, progress: bool = False,
                  dtype: str = "float32") -> Evaluator:
    """The evaluators' one `Evaluator` over the in-process JAX scorer (choice_logprob / loglik tasks): PEFT folders,
    in-memory children (`InMemoryAdapter`) or None (the base model). No rank limit: nothing is loaded into vLLM."""
    backend = JaxScorer(model_path, response_cls=ChoiceResponse, dtype=dtype)
    return Evaluator(backend, model=model_path, max_lora_rank=None, cache=ResultCache(cache_dir), progress=progress)


def in_memory_adapters(factors, n: int) -> list[InMemoryAdapter]:
    """The n individuals of the numpy pytree `factors` (leaves (n, ...)) as JAX-backend adapter handles."""
    return [InMemoryAdapter(key=_digest(factors, j), factors=jax.tree_util.tree_map(lambda a: a[j:j + 1], factors))
            for j in range(n)]


class LLMScorer:
    """Real tasks through one `Evaluator`: children exported as PEFT folders (tmpfs) to the vLLM evaluator, or handed
    in memory to the JAX scorer (`--backend jax`, no export). Fitness = weighted task scores on the dev split."""

    kind = "llm"

    def __init__(self, cfg: RunConfig, model_path: str, rank: int, cache_dir: Path, progress: bool):
        self.cfg = cfg
        self.model_path = model_path
        self.fit_tasks = [get_task(t, formatter=model_path, mode=cfg.scoring) for t in cfg.tasks]
        self.report_tasks = self.fit_tasks + [self._unseen(t) for t in cfg.unseen_tasks]
        self.cache_hits = 0  # individuals served whole from the evaluator's result cache
        self.scratch = None
        self.progress = progress
        if cfg.backend == "jax":
            self.evaluator = jax_evaluator(model_path, cache_dir=str(cache_dir), progress=progress)
        else:
            self.evaluator = make_evaluator(model_path, **evaluator_kwargs(cfg, rank), cache_dir=str(cache_dir),
                                            progress=progress)
            self.scratch = Path(scratch_dir("genome-run-"))
        self.evaluator.backend.start()  # start the engine now, so its start-up time is reported on its own

    def _unseen(self, name: str):
        task = get_task(name, formatter=self.model_path)
        if self.cfg.scoring and self.cfg.scoring in task.modes:
            task = get_task(name, formatter=self.model_path, mode=self.cfg.scoring)
        return task

    def evaluate(self, factors, meta, names: list[str], tasks, split: str, n: int | None, timer: Timer,
                 *, desc: str = "scoring") -> list[dict]:
        """Per individual of the numpy pytree `factors` (leaves (m, ...)): {task name: TaskResult} on `split`."""
        if self.cfg.backend == "jax":
            with timer("scoring"):
                results = self.evaluator.evaluate(in_memory_adapters(factors, len(names)), tasks, split, n, desc=desc)
        else:
            folder = Path(tempfile.mkdtemp(prefix=f"{split}-", dir=self.scratch))
            try:
                with timer("export"):
                    pop = Population(factors=factors, meta=dataclasses.replace(meta, names=tuple(names)))
                    dirs = [str(export_adapter(pop, j, folder / f"ind{j:03d}")) for j in range(len(names))]
                faults.point("exported")
                with timer("scoring"):
                    results = self.evaluator.evaluate(dirs, tasks, split, n, desc=desc)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self.cache_hits += sum(1 for r in results if r.cached)
        faults.point("scored")
        return [r.tasks for r in results]

    def dev_fitness(self, factors, idx, meta, timer: Timer, progress: bool) -> list[float]:
        sub = _host(factors, idx)
        res = self.evaluate(sub, meta, [f"ind{i}" for i in idx], self.fit_tasks, "dev", self.cfg.n_dev, timer)
        return [weighted_fitness([r[t.name] for t in self.fit_tasks], self.cfg.weights) for r in res]

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
            self.evaluator = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
