"""Ensembles: hand-computed votes and probability averages, tie-breaks, and ranking on dev only."""
import collections
import dataclasses
import math

import numpy as np
import pytest

from evaluators.ensemble import DevRanking, ensemble, ensemble_task, vote_sample
from evaluators.errors import UserError
from evaluators.tasks.base import TaskResult

GOLD = ("A", "B", "C", "D")
LABELS = (("A", "B", "C", "D"),) * 4


def mc(split, preds, probs=None, task="mmlu", gold=GOLD):
    per = tuple(float(p == g) for p, g in zip(preds, gold))
    return TaskResult(task=task, split=split, mode="choice_logprob" if probs else "generate",
                      score=sum(per) / len(per), metrics={}, predictions=tuple(preds), per_sample=per,
                      references=gold, ids=tuple(str(i) for i in range(len(gold))),
                      option_probs=None if probs is None else tuple(tuple(p) for p in probs), options=LABELS)


def dev(score, task="mmlu"):
    return TaskResult(task=task, split="dev", mode="choice_logprob", score=score, metrics={}, predictions=(),
                      per_sample=(), references=(), ids=())


# three individuals; dev fitness 0.5, 0.9, 0.7 -> rank order 1, 2, 0
DEV = [dev(0.5), dev(0.9), dev(0.7)]
TEST = [
    mc("test", "AAAA", [[.9, .05, .03, .02], [.4, .3, .2, .1], [.4, .3, .2, .1], [.4, .3, .2, .1]]),
    mc("test", "ABDD", [[.4, .3, .2, .1], [.1, .6, .2, .1], [.1, .1, .35, .45], [.1, .1, .1, .7]]),
    mc("test", "BCCA", [[.3, .5, .1, .1], [.1, .2, .6, .1], [.1, .1, .7, .1], [.5, .1, .1, .3]]),
]


def test_hand_computed_vote_and_probability_average():
    ranking = DevRanking.from_dev_results(DEV)
    assert ranking.order == (1, 2, 0) and ranking.fitness == (0.5, 0.9, 0.7)
    e = ensemble_task(ranking, TEST)
    # k=1: individual 1 alone. k=2: ties between 1 and 2 go to 1 -> A B D D. k=3: A (2 votes), B (3-way tie -> 1),
    # D (3-way tie -> 1, wrong), A (2 votes, wrong)
    assert e.vote == pytest.approx((0.75, 0.75, 0.5))
    # k=2 means: s0 [.35,.4,..] -> B wrong; s1 B/C tie at .4 -> B; s2 C; s3 D. k=3: A B C D all right
    assert e.prob_avg == pytest.approx((0.75, 0.75, 1.0))
    assert e.single == pytest.approx((0.75, 0.25, 0.25)) and e.members == (1, 2, 0)


def test_k_max_and_misaligned_inputs():
    ranking = DevRanking.from_dev_results(DEV)
    assert ensemble_task(ranking, TEST, k_max=2).vote == pytest.approx((0.75, 0.75))
    with pytest.raises(UserError, match="k_max must be in 1..3"):
        ensemble_task(ranking, TEST, k_max=4)
    with pytest.raises(UserError, match="2 test results for 3 ranked individuals"):
        ensemble_task(ranking, TEST[:2])
    other = dataclasses.replace(TEST[2], ids=("9", "1", "2", "3"))
    with pytest.raises(UserError, match="not on the same samples"):
        ensemble_task(ranking, [TEST[0], TEST[1], other])


def test_vote_tie_break_and_abstention():
    assert vote_sample(["x", "y"], [0.0, 1.0]) == ("x", 0.0)  # tie: best-ranked member's answer
    assert vote_sample(["x", "y", "y"], [0.0, 1.0, 1.0]) == ("y", 1.0)  # majority
    assert vote_sample(["", "y", ""], [0.0, 0.5, 0.0]) == ("y", 0.5)  # "" abstains, never wins
    assert vote_sample(["", ""], [0.0, 0.0]) == ("", 0.0)
    with pytest.raises(ValueError, match="scored differently"):
        vote_sample(["x", "x"], [0.0, 1.0])


def test_free_answer_vote_keeps_f1_of_the_voted_answer():
    def fa(split, preds, f1):
        return TaskResult(task="drop", split=split, mode="generate", score=sum(f1) / len(f1), metrics={},
                          predictions=tuple(preds), per_sample=tuple(f1), references=("16", "houston"),
                          ids=("a", "b"))
    ranking = DevRanking.from_dev_results([dev(0.2, "drop"), dev(0.3, "drop"), dev(0.1, "drop")])  # order 1, 0, 2
    test = [fa("test", ["16 years", "houston"], [2 / 3, 1.0]), fa("test", ["", "dallas"], [0.0, 0.0]),
            fa("test", ["16 years", "houston"], [2 / 3, 1.0])]
    e = ensemble_task(ranking, test)
    # k=1: ind 1 -> 0, 0. k=2: "" abstains -> "16 years" (2/3); dallas vs houston tie -> ind 1's dallas (0).
    # k=3: "16 years" (2/3); houston 2 votes (1.0)
    assert e.vote == pytest.approx((0.0, (2 / 3) / 2, (2 / 3 + 1) / 2))
    assert e.prob_avg is None


def test_ranking_uses_dev_only():
    # the dev-best individual (1) is the worst on test; the ensemble must still start from it
    test = [mc("test", "ABCD"), mc("test", "DDDA"), mc("test", "ABCA")]
    ranking = DevRanking.from_dev_results(DEV)
    e = ensemble_task(ranking, test)
    assert e.members == (1, 2, 0) and e.vote[0] == 0.0 and e.single[0] == 0.0
    # permuting test scores never changes the members
    assert ensemble_task(ranking, test[::-1]).members == (1, 2, 0)
    # a ranking cannot be made from test results, floats, or by hand
    with pytest.raises(UserError, match="ranking needs dev-split results, got split 'test'"):
        DevRanking.from_dev_results(test)
    with pytest.raises(TypeError, match="built only by DevRanking.from_dev_results"):
        DevRanking(fitness=(0.1, 0.2, 0.3), order=(2, 1, 0), tasks=("mmlu",))
    with pytest.raises(TypeError, match="ranking must be a DevRanking"):
        ensemble_task([0.1, 0.9, 0.5], test)
    with pytest.raises(TypeError):
        DevRanking.from_dev_results([0.5, 0.9, 0.7])
    # and the combined predictions must be test predictions
    with pytest.raises(UserError, match="combine test-split predictions, got split 'dev'"):
        ensemble_task(ranking, [dataclasses.replace(t, split="dev") for t in test])


def test_ranking_ties_and_nan():
    r = DevRanking.from_dev_results([dev(0.5), dev(math.nan), dev(0.5), dev(0.9)])
    assert r.order == (3, 0, 2, 1)


def test_multi_task_report_with_weights():
    def gen(split, preds, gold, task):
        per = tuple(float(p == g) for p, g in zip(preds, gold))
        return TaskResult(task=task, split=split, mode="generate", score=sum(per) / len(per), metrics={},
                          predictions=tuple(preds), per_sample=per, references=gold, ids=("0", "1"))
    devs = [{"mmlu": dev(s), "gsm8k": dev(g, "gsm8k")} for s, g in [(0.5, 0.0), (0.9, 0.2), (0.7, 0.1)]]
    ranking = DevRanking.from_dev_results(devs, weights=[3, 1])
    assert ranking.fitness == pytest.approx((0.375, 0.725, 0.55)) and ranking.order == (1, 2, 0)
    tests = [{"mmlu": t, "gsm8k": gen("test", p, ("4", "7"), "gsm8k")} for t, p in zip(TEST, [("4", "7"), ("4", "8"),
                                                                                               ("5", "8")])]
    rep = ensemble(ranking, tests, weights=[3, 1])
    g = rep.per_task["gsm8k"]
    assert g.vote == pytest.approx((0.5, 0.5, 0.5)) and g.prob_avg is None
    # mmlu contributes prob_avg (it has option probabilities), gsm8k its vote
    assert rep.weighted == pytest.approx(tuple(0.75 * m + 0.25 * v for m, v in zip((0.75, 0.75, 1.0), g.vote)))
    js = rep.to_json()
    assert js["order"] == [1, 2, 0] and set(js["per_task"]) == {"mmlu", "gsm8k"}


def test_random_populations_match_numpy_reference():
    rng = np.random.default_rng(0)
    P, n, O = 6, 40, 4
    labels = "ABCD"
    gold = tuple(rng.choice(list(labels), n))
    dev_fit = rng.random(P)
    probs = rng.dirichlet(np.ones(O), size=(P, n))
    preds = [["" if rng.random() < 0.1 else labels[int(np.argmax(probs[i, s]))] for s in range(n)] for i in range(P)]
    test = [dataclasses.replace(mc("test", preds[i], probs[i].tolist(), gold=gold),
                                options=(tuple(labels),) * n, ids=tuple(map(str, range(n)))) for i in range(P)]
    e = ensemble_task(DevRanking.from_dev_results([dev(f) for f in dev_fit]), test)
    order = list(np.argsort(-dev_fit, kind="stable"))
    for k in range(1, P + 1):
        top = order[:k]
        mean = probs[top].mean(axis=0)  # (n, O)
        assert e.prob_avg[k - 1] == pytest.approx(np.mean([labels[int(np.argmax(mean[s]))] == gold[s] for s in range(n)]))
        hits = 0
        for s in range(n):
            votes = collections.Counter(preds[i][s] for i in top if preds[i][s])
            if votes:
                best = max(votes.values())
                winner = next(preds[i][s] for i in top if votes.get(preds[i][s]) == best)
                hits += winner == gold[s]
        assert e.vote[k - 1] == pytest.approx(hits / n)
    assert e.vote[0] == pytest.approx(test[order[0]].score)
