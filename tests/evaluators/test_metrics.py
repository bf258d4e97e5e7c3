"""Metrics against references written from their definitions (numpy / plain Python), and hand-computed cases."""
import math
import re
import string

import numpy as np
import pytest

from evaluators.errors import UserError
from evaluators.tasks import metrics as M
from evaluators.tasks.base import TaskResult


# ---------------------------------------------------------------------------------------------- reference
def ref_normalize(text: str) -> list[str]:
    """Definition: lower-case; drop the articles a/an/the; tokens split on whitespace; a token that is a number
    (after stripping surrounding punctuation, commas as thousands separators) is its value; other tokens lose all
    punctuation; empty tokens vanish."""
    toks = []
    for tok in text.lower().split():
        if tok in ("a", "an", "the"):
            continue
        core = tok.strip("".join(c for c in string.punctuation if c != "-")).rstrip("-")
        if re.fullmatch(r"-?\d[\d,]*(\.\d+)?", core):
            v = float(core.replace(",", ""))
            toks.append(str(int(v)) if v == int(v) else repr(v))
            continue
        t = "".join(c for c in tok if c not in string.punctuation)
        if t and t not in ("a", "an", "the"):
            toks.append(t)
    return toks


def ref_f1(pred: str, gold: str) -> float:
    """F1 = 2PR/(P+R) over token multisets, with numpy counting."""
    p, g = ref_normalize(pred), ref_normalize(gold)
    if len(p) == 0 or len(g) == 0:
        return float(len(p) == len(g))
    vocab = sorted(set(p) | set(g))
    cp = np.array([p.count(v) for v in vocab])
    cg = np.array([g.count(v) for v in vocab])
    overlap = np.minimum(cp, cg).sum()
    if overlap == 0:
        return 0.0
    prec, rec = overlap / len(p), overlap / len(g)
    return float(2 * prec * rec / (prec + rec))


CASES = [
    ("16 years", "16"),
    ("The answer is Houston.", "Houston"),
    ("Bangkok Metropolitan Region", "Bangkok Metropolitan Region"),
    ("2.0", "2"),
    ("1,000 people", "1000"),
    ("x x y", "x y y"),
    ("", "Houston"),
    ("Houston", ""),
    ("Donald Trump and George W. Bush", "Donald Trump"),
    ("Cambodian, Filipino and Korean", "Cambodian and Filipino and Korean and Pakistani and Laotian"),
    ("93.5.", "93.5"),
    ("-3 points", "-3"),
    ("an apple", "apple"),
    ("completely different", "Houston"),
]


@pytest.mark.parametrize("pred,gold", CASES)
def test_token_f1_matches_reference(pred, gold):
    assert M.token_f1(pred, gold) == pytest.approx(ref_f1(pred, gold), abs=1e-12)


def test_token_f1_hand_computed():
    assert M.token_f1("16 years", "16") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)  # overlap 2, P = R = 2/3
    assert M.token_f1("Donald Trump and George W. Bush", "Donald Trump") == pytest.approx(2 * (2 / 6) * 1 / (2 / 6 + 1))
    assert M.token_f1("2.0", "2") == 1.0
    assert M.token_f1("", "") == 1.0 and M.token_f1("", "x") == 0.0


def test_token_f1_random_strings_match_reference():
    rng = np.random.default_rng(0)
    words = ["the", "a", "a-b", "The.", "cat", "dog", "12", "12.0", "3,000", "3000", "Red,", "red", "blue.", "an", "x"]
    for _ in range(300):
        p = " ".join(rng.choice(words, rng.integers(0, 6)))
        g = " ".join(rng.choice(words, rng.integers(1, 6)))
        assert M.token_f1(p, g) == pytest.approx(ref_f1(p, g), abs=1e-12), (p, g)


def test_exact_match_and_max_f1_over_accepted_answers():
    golds = ["Nugent", "Mike Nugent"]
    assert M.exact_match("mike nugent.", golds) == 1.0
    assert M.exact_match("Nugent kicked", golds) == 0.0
    assert M.max_f1("Nugent kicked", golds) == pytest.approx(max(ref_f1("Nugent kicked", g) for g in golds))


def test_numbers():
    assert M.canonical_number("36,000") == "36000"
    assert M.canonical_number("2.50") == "2.5"
    assert M.canonical_number("$7.") == "7"
    assert M.numeric_match("165000", "165,000") and M.numeric_match("2.0", "2")
    assert not M.numeric_match("21", "12") and not M.numeric_match("", "3") and not M.numeric_match("abc", "3")
    assert M.normalize_short(" Yes. ") == "yes" and M.normalize_short("11.0") == "11"


def test_softmax_and_argmax():
    lp = [-1.0, -2.0, -0.5, -3.0]
    p = np.exp(lp) / np.exp(lp).sum()
    assert M.softmax(lp) == pytest.approx(tuple(p))
    assert M.softmax([-1000.0, -1001.0]) == pytest.approx((1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))))
    assert M.softmax([0.0, -math.inf]) == (1.0, 0.0)
    assert M.argmax([0.1, 0.3, 0.3]) == 1  # ties: first
    with pytest.raises(ValueError):
        M.softmax([-math.inf, -math.inf])


def _res(task, score):
    return TaskResult(task=task, split="dev", mode="generate", score=score, metrics={}, predictions=(),
                      per_sample=(), references=(), ids=())


def test_weights_validation_and_weighted_fitness():
    assert M.normalize_weights(None, 2) == ((0.5, 0.5), None)
    assert M.normalize_weights([0.4, 0.6], 2) == ((0.4, 0.6), None)
    w, note = M.normalize_weights([2, 6], 2)
    assert w == pytest.approx((0.25, 0.75)) and "normalised" in note
    with pytest.raises(UserError, match="2 values but there are 3 tasks"):
        M.normalize_weights([1, 1], 3, ["a", "b", "c"])
    with pytest.raises(UserError, match=">= 0"):
        M.normalize_weights([1, -1], 2)
    with pytest.raises(UserError, match="must be > 0"):
        M.normalize_weights([0, 0], 2)
    with pytest.raises(UserError, match="finite"):
        M.normalize_weights([math.nan, 1], 2)
    results = {"mmlu": _res("mmlu", 0.5), "gsm8k": _res("gsm8k", 0.1), "arc_c": _res("arc_c", 0.9)}
    assert M.weighted_fitness(results, [0.4, 0.3, 0.3]) == pytest.approx(0.4 * 0.5 + 0.3 * 0.1 + 0.3 * 0.9)
    assert M.weighted_fitness(list(results.values()), [4, 3, 3]) == pytest.approx(0.4 * 0.5 + 0.3 * 0.1 + 0.3 * 0.9)
    assert M.weighted_fitness(list(results.values())) == pytest.approx((0.5 + 0.1 + 0.9) / 3)
    assert math.isnan(M.weighted_fitness([_res("a", math.nan), _res("b", 1.0)]))
    with pytest.raises(UserError):
        M.weighted_fitness(results, [1.0])
