"""The `loglik` scoring mode on the task side (no model): contexts and continuations per task, WinoGrande's partial
scoring, acc / acc_norm against hand computations, and the bad-input refusals. The backends' log-likelihoods are
checked against the transformers reference in tests/evaluators/backends/test_loglik_routes.py."""
from __future__ import annotations

import json
import math

import pytest

from evaluators.errors import UserError
from evaluators.protocol import ChoiceRequest, ChoiceResponse
from evaluators.tasks import LOGLIK, get_task
from evaluators.tasks.prompts import identity_formatter

FMT = lambda msg: f"<user>{msg}<assistant>"  # noqa: E731  a stand-in chat template


def _write(path, items, split="dev"):
    path.write_text(json.dumps({split: items, "test" if split == "dev" else "dev": items[:1]}))
    return str(path)


def test_default_context_and_option_texts():
    task = get_task("arc_e", mode=LOGLIK)
    item = task.load("dev", 1)[0]
    [req] = task.build_requests([item])
    assert req == ChoiceRequest(prompt=f"Question: {item['question']}\nAnswer:",
                                options=tuple(f" {t}" for t in item["choices"].values()))


def test_hellaswag_and_boolq_contexts():
    hs = get_task("hellaswag", mode=LOGLIK)
    item = hs.load("dev", 1)[0]
    [req] = hs.build_requests([item])
    assert req.prompt == item["question"] and req.options == tuple(f" {t}" for t in item["choices"].values())
    bq = get_task("boolq", mode=LOGLIK)
    item = bq.load("dev", 1)[0]
    passage, question = item["question"].split("\nQuestion: ")
    [req] = bq.build_requests([item])
    assert req.prompt == f"{passage}\nQuestion: {question}\nAnswer:" and question.endswith("?")
    assert req.options == (" no", " yes")


def test_loglik_chat_variant_wraps_the_query():
    task = get_task("piqa", mode=LOGLIK, formatter=FMT, loglik_chat=True)
    item = task.load("dev", 1)[0]
    [req] = task.build_requests([item])
    assert req.prompt == f"<user>Question: {item['question']}<assistant>Answer:"


def test_winogrande_partial_scoring_requests():
    """One request per option: the sentence up to the blank with the option filled in, continued by the text after
    the blank, verbatim (a leading space when the sentence had one, none before "'s")."""
    task = get_task("winogrande")
    assert task.mode == LOGLIK
    items = [{"question": "Brian was jealous of Brett's new car because _ couldn't afford to buy a new car.",
              "choices": {"A": "Brian", "B": "Brett"}, "answer": "A", "id": "w1"},
             {"question": "The cup fell off the table, so _'s owner was sad.",
              "choices": {"A": "the cup", "B": "the table"}, "answer": "A", "id": "w2"}]
    assert task.build_requests(items) == [
        ChoiceRequest("Brian was jealous of Brett's new car because Brian", (" couldn't afford to buy a new car.",)),
        ChoiceRequest("Brian was jealous of Brett's new car because Brett", (" couldn't afford to buy a new car.",)),
        ChoiceRequest("The cup fell off the table, so the cup", ("'s owner was sad.",)),
        ChoiceRequest("The cup fell off the table, so the table", ("'s owner was sad.",)),
    ]
    # two responses per item, in request order; the same continuation, so acc_norm == acc
    resp = [ChoiceResponse((-5.0,)), ChoiceResponse((-7.0,)), ChoiceResponse((-3.0,)), ChoiceResponse((-2.0,))]
    r = task.score(items, resp)
    assert r.predictions == ("A", "B") and r.per_sample == (1.0, 0.0)
    assert r.metrics == {"acc": 0.5, "acc_norm": 0.5} and r.mode == LOGLIK
    assert r.option_probs[0] == pytest.approx((1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))))
    with pytest.raises(ValueError, match="3 responses for 4"):
        task.score(items, resp[:3])


def test_acc_and_acc_norm_by_hand():
    """acc: argmax of summed log-probs; acc_norm: argmax of log-prob / UTF-8 bytes of the continuation (leading
    space included; "é" is 2 bytes)."""
    items = [{"question": "q1", "choices": {"A": "a", "B": "bbbbbb"}, "answer": "B", "_split": "dev", "_index": 0},
             {"question": "q2", "choices": {"A": "éé", "B": "x"}, "answer": "A", "_split": "dev", "_index": 1}]
    # item 1: lp -2 / 2 bytes = -1.0 vs -3.5 / 7 bytes = -0.5 -> acc says A (wrong), acc_norm says B (right)
    # item 2: " éé" is 5 bytes: -4 / 5 = -0.8 vs -1.5 / 2 = -0.75 -> acc says B (wrong), acc_norm says B (wrong)
    resp = [ChoiceResponse((-2.0, -3.5)), ChoiceResponse((-4.0, -1.5))]
    for metric, preds, probs0 in (("acc", ("A", "B"), (-2.0, -3.5)), ("acc_norm", ("B", "B"), (-1.0, -0.5))):
        task = get_task("piqa", mode=LOGLIK)
        task.loglik_metric = metric
        r = task.score(items, resp)
        assert r.metrics == {"acc": 0.0, "acc_norm": 0.5}
        assert r.predictions == preds and r.score == r.metrics[metric]
        z = sum(math.exp(v) for v in probs0)
        assert r.option_probs[0] == pytest.approx(tuple(math.exp(v) / z for v in probs0))
    reqs = get_task("piqa", mode=LOGLIK).build_requests(items)
    assert [r.options for r in reqs] == [(" a", " bbbbbb"), (" éé", " x")]


def test_item_without_choices_is_refused_naming_file_and_id(tmp_path):
    good = {"question": "q?", "choices": {"A": "x", "B": "y"}, "answer": "A", "id": "ok"}
    path = _write(tmp_path / "mc.json", [good, {"question": "q2?", "answer": "A", "id": "nochoice"}])
    task = get_task(path, mode=LOGLIK)
    with pytest.raises(UserError, match=rf"^{path}: dev item 1 \(id 'nochoice'\): missing field 'choices'$"):
        task.build_requests(task.load("dev"))
    # a file without any `choices` cannot be scored by log-likelihood at all
    path = _write(tmp_path / "em.json", [{"question": "2+2?", "answer": "4", "id": "e0"}])
    with pytest.raises(UserError, match=rf"^{path}: dev item 0 \(id 'e0'\) has no 'choices'; scoring mode 'loglik'"):
        get_task(path, mode=LOGLIK)
    # an empty option text has nothing to score
    path = _write(tmp_path / "empty.json", [good, {**good, "choices": {"A": " ", "B": "y"}, "id": "blank"}])
    task = get_task(path, mode=LOGLIK)
    with pytest.raises(UserError, match=r"dev item 1 \(id 'blank'\): choice 'A' has no text to score"):
        task.build_requests(task.load("dev"))


@pytest.mark.parametrize("sentence, found", [("No blank here.", 0), ("Both _ and _ are blanks.", 2)])
def test_winogrande_item_without_exactly_one_blank_is_refused(tmp_path, sentence, found):
    good = {"question": "A _ b.", "choices": {"A": "x", "B": "y"}, "answer": "A", "id": "g"}
    (tmp_path / "winogrande.json").write_text(json.dumps(
        {"dev": [good, {**good, "question": sentence, "id": "bad"}], "test": [good]}))
    task = get_task("winogrande", data_dir=str(tmp_path))
    with pytest.raises(UserError, match=rf"^{tmp_path / 'winogrande.json'}: dev item 1 \(id 'bad'\): a WinoGrande "
                                        rf"sentence needs exactly one '_' blank, found {found}$"):
        task.build_requests(task.load("dev"))


@pytest.mark.parametrize("mode", ["choice_logprob", "generate"])
def test_winogrande_refuses_other_modes(mode):
    with pytest.raises(UserError, match=rf"^task 'winogrande' is a fill-in-the-blank task scored only with "
                                        rf"'loglik' \(partial scoring\), not '{mode}'$"):
        get_task("winogrande", mode=mode)
    task = get_task("winogrande")
    with pytest.raises(UserError, match="scored only with 'loglik'"):
        task.build_requests(task.load("dev", 1), mode)


def test_every_multiple_choice_task_builds_loglik_requests():
    for name in ("mmlu", "arc_c", "medmcqa", "truthfulqa", "hellaswag", "arc_e", "piqa", "openbookqa", "boolq",
                 "commonsense_qa", "winogrande"):
        task = get_task(name, mode=LOGLIK, formatter=identity_formatter)
        items = task.load("test")
        reqs = task.build_requests(items)
        assert sum(len(r.options) for r in reqs) == sum(len(it["choices"]) for it in items), name
        assert all(o.strip() for r in reqs for o in r.options), name
