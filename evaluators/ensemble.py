"""Top-k ensembles of evolved individuals: majority vote over per-sample predictions and, for choice_logprob and
loglik tasks, averaged option probabilities. Accuracy for k = 1..K.

Ranking comes from DEV results only. The ensemble functions accept the ranking solely as a `DevRanking`, which can
only be built by `DevRanking.from_dev_results(...)` from TaskResults whose split is "dev"; the predictions to combine
must be TaskResults of the "test" split. Test scores therefore cannot leak into the choice of members.

Rules (deterministic):
- members for k: the k individuals with the highest dev fitness; fitness ties go to the lower input index; NaN dev
  fitness ranks last.
- vote: per sample, the most frequent non-empty prediction among the members ("" = no answer extracted = abstain);
  a tie between answers goes to the answer of the best-ranked member among those giving a tied answer. If every
  member abstains the sample scores 0. The voted answer scores what its givers scored on that sample.
- prob_avg (choice_logprob and loglik): per sample, the mean of the members' option probabilities; the option with the
  highest mean wins (exact ties: the first option), scored 1 if it is the gold label.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from evaluators.errors import UserError
from evaluators.tasks.base import TaskResult
from evaluators.tasks.metrics import argmax, normalize_weights, weighted_fitness

_FROM_DEV = object()  # only DevRanking.from_dev_results holds this


@dataclasses.dataclass(frozen=True)
class DevRanking:
    """Individuals ranked by dev fitness (best first). Build with DevRanking.from_dev_results(...).

    fitness: (P,) dev fitness per individual, input order; order: (P,) indices, best first.
    """

    fitness: tuple[float, ...]
    order: tuple[int, ...]
    tasks: tuple[str, ...]
    _origin: object = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self._origin is not _FROM_DEV:
            raise TypeError("DevRanking is built only by DevRanking.from_dev_results(dev task results): "
                            "ensembles are ranked on dev fitness, never on test")

    @classmethod
    def from_dev_results(cls, dev_results: Sequence[Mapping[str, TaskResult] | Sequence[TaskResult] | TaskResult],
                         weights: Sequence[float] | None = None) -> "DevRanking":
        """dev_results[i]: individual i's dev-split TaskResult(s) (one, a list in task order, or {task: result}).
        Fitness = weighted_fitness over tasks (weights validated/normalised; None = equal)."""
        if not dev_results:
            raise UserError("no individuals to rank")
        per_ind = [_as_list(r) for r in dev_results]
        tasks = tuple(r.task for r in per_ind[0])
        for i, rs in enumerate(per_ind):
            if tuple(r.task for r in rs) != tasks:
                raise UserError(f"individual {i} has dev results for tasks {[r.task for r in rs]}, expected {list(tasks)}")
            for r in rs:
                if not isinstance(r, TaskResult):
                    raise TypeError(f"dev results must be TaskResult objects, got {type(r).__name__}")
                if r.split != "dev":
                    raise UserError(f"individual {i}, task '{r.task}': ranking needs dev-split results, got split "
                                    f"'{r.split}' (ensembles are never ranked on test)")
        fitness = tuple(weighted_fitness(rs, weights) for rs in per_ind)
        order = tuple(sorted(range(len(fitness)), key=lambda i: (math.isnan(fitness[i]), -_nan0(fitness[i]), i)))
        return cls(fitness=fitness, order=order, tasks=tasks, _origin=_FROM_DEV)

    def __len__(self) -> int:
        return len(self.fitness)


@dataclasses.dataclass(frozen=True)
class TaskEnsemble:
    """Test accuracy of top-k ensembles for one task; index j of each tuple is k = j + 1."""

    task: str
    members: tuple[int, ...]  # individuals best first (the top-k are members[:k])
    vote: tuple[float, ...]  # (K,)
    prob_avg: tuple[float, ...] | None  # (K,) choice_logprob and loglik tasks only
    single: tuple[float, ...]  # (K,) test score of the k-th ranked individual alone (for reference)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EnsembleReport:
    """Per-task ensembles plus the weighted combination over tasks (prob_avg where a task has it, else vote)."""

    ranking: DevRanking
    per_task: dict[str, TaskEnsemble]
    weighted: tuple[float, ...]  # (K,)

    def to_json(self) -> dict:
        return {"dev_fitness": list(self.ranking.fitness), "order": list(self.ranking.order),
                "weighted": list(self.weighted), "per_task": {k: v.to_json() for k, v in self.per_task.items()}}


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _as_list(r) -> list[TaskResult]:
    """One individual's results: a TaskResult, a sequence of them, {task: result}, or an object with such a
    `.tasks` mapping (backends.base.IndividualResult)."""
    if isinstance(r, TaskResult):
        return [r]
    if isinstance(getattr(r, "tasks", None), Mapping):
        return list(r.tasks.values())
    if isinstance(r, Mapping):
        return list(r.values())
    return list(r)


def vote_sample(predictions: Sequence[str], scores: Sequence[float]) -> tuple[str, float]:
    """Majority vote for one sample. predictions/scores: members' answers and their scores, best-ranked first.
    Returns (answer, score); ("", 0.0) when all abstain."""
    counts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for j, p in enumerate(predictions):
        if p == "":
            continue
        counts[p] = counts.get(p, 0) + 1
        first_seen.setdefault(p, j)
    if not counts:
        return "", 0.0
    top = max(counts.values())
    winner = min((p for p, c in counts.items() if c == top), key=lambda p: first_seen[p])
    given = {scores[j] for j, p in enumerate(predictions) if p == winner}
    if len(given) != 1:
        raise ValueError(f"answer {winner!r} scored differently across individuals: {sorted(given)}")
    return winner, given.pop()


def ensemble_task(ranking: DevRanking, test_results: Sequence[TaskResult], k_max: int | None = None) -> TaskEnsemble:
    """Top-k ensembles (k = 1..k_max, default all) of one task's test results; test_results[i] is individual i's."""
    if not isinstance(ranking, DevRanking):
        raise TypeError("ranking must be a DevRanking built from dev results (DevRanking.from_dev_results)")
    P = len(ranking)
    if len(test_results) != P:
        raise UserError(f"{len(test_results)} test results for {P} ranked individuals")
    first = test_results[0]
    for i, r in enumerate(test_results):
        if r.split != "test":
            raise UserError(f"individual {i}, task '{r.task}': ensembles combine test-split predictions, got split "
                            f"'{r.split}'")
        if r.task != first.task or r.ids != first.ids or r.references != first.references:
            raise UserError(f"individual {i}: test results of task '{r.task}' are not on the same samples as "
                            f"individual 0 ('{first.task}')")
    K = P if k_max is None else k_max
    if not 1 <= K <= P:
        raise UserError(f"k_max must be in 1..{P}, got {k_max}")
    n = first.n
    use_probs = all(r.option_probs is not None for r in test_results)
    vote, prob_avg, single = [], [], []
    for k in range(1, K + 1):
        members = [test_results[i] for i in ranking.order[:k]]
        single.append(members[-1].score)
        vote.append(sum(vote_sample([m.predictions[s] for m in members], [m.per_sample[s] for m in members])[1]
                        for s in range(n)) / n)
        if use_probs:
            hits = 0
            for s in range(n):
                n_opt = len(members[0].option_probs[s])
                mean = [sum(m.option_probs[s][o] for m in members) / k for o in range(n_opt)]
                hits += first.options[s][argmax(mean)] == first.references[s]
            prob_avg.append(hits / n)
    return TaskEnsemble(task=first.task, members=ranking.order, vote=tuple(vote),
                        prob_avg=tuple(prob_avg) if use_probs else None, single=tuple(single))


def ensemble(ranking: DevRanking, test_results: Sequence[Mapping[str, TaskResult] | Sequence[TaskResult] | TaskResult],
             weights: Sequence[float] | None = None, k_max: int | None = None) -> EnsembleReport:
    """Top-k ensembles on every task. test_results[i]: individual i's test TaskResult(s), tasks in the same order as
    the ranking's dev results (or a {task: result} mapping with those names)."""
    if not isinstance(ranking, DevRanking):
        raise TypeError("ranking must be a DevRanking built from dev results (DevRanking.from_dev_results)")
    per_ind = [_as_list(r) for r in test_results]
    tasks = [r.task for r in per_ind[0]] if per_ind else []
    w, _ = normalize_weights(weights, len(tasks), tasks)
    per_task = {}
    for t, name in enumerate(tasks):
        per_task[name] = ensemble_task(ranking, [rs[t] for rs in per_ind], k_max)
    K = len(next(iter(per_task.values())).vote)
    weighted = tuple(sum(wt * (e.prob_avg or e.vote)[j] for wt, e in zip(w, per_task.values())) for j in range(K))
    return EnsembleReport(ranking=ranking, per_task=per_task, weighted=weighted)
