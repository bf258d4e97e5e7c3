"""`genome train-experts` wiring: training pairs are exactly what loglik scoring compares, and the named pools'
sources leave the evolution targets untouched."""
from __future__ import annotations

import pytest

from evaluators.tasks import get_task
from genome_jax.errors import UserError
from genome_jax.models import trainer
from scripts import train_experts


def test_loglik_pairs_are_the_gold_options_requests():
    boolq = get_task("boolq")
    items = boolq.load("dev", 4)
    for it, (ctx, cont) in zip(items, train_experts.loglik_pairs(boolq, items)):
        assert ctx == it["question"] + "\nAnswer:"  # "{passage}\nQuestion: {q}?\nAnswer:" (docs/TASKS.md)
        assert cont == " " + it["choices"][it["answer"]].strip() and cont in (" yes", " no")
    wino = get_task("winogrande")
    it = wino.load("dev", 1)[0]
    (ctx, cont), = train_experts.loglik_pairs(wino, [it])
    q, gold = it["question"], it["choices"][it["answer"]]
    assert ctx == q[: q.index("_")] + gold.strip() and cont == q[q.index("_") + 1:].rstrip()  # partial scoring
    gsm = get_task("gsm8k")
    with pytest.raises(UserError, match="has no loglik mode"):
        train_experts.loglik_pairs(gsm, gsm.load("dev", 1))


def test_choice_items_hold_every_option_in_label_order_and_the_gold_index():
    """The options loss trains on all of an item's scored sequences: the same (context, continuation) pairs the
    task's loglik mode scores, in label order, with the gold label's index (a text-independent check: the gold
    pair is loglik_pairs' gold, and every option text appears once)."""
    for name in ("arc_c", "winogrande", "boolq"):
        task = get_task(name)
        items = task.load("dev", 6)
        got = train_experts.loglik_choice_items(task, items)
        for it, (pairs, gold), gold_pair in zip(items, got, train_experts.loglik_pairs(task, items)):
            labels = list(it["choices"])
            assert len(pairs) == len(labels) and pairs[gold] == gold_pair and labels[gold] == it["answer"]
            for (ctx, cont), label in zip(pairs, labels):
                text = str(it["choices"][label]).strip()
                assert text in ctx + cont  # WinoGrande substitutes the option into the context; others continue
    bad = dict(get_task("arc_c").load("dev", 1)[0], answer="Z")
    with pytest.raises(UserError, match="not one of the choices"):
        train_experts.loglik_choice_items(get_task("arc_c"), [bad])


def test_slices_and_pools_keep_targets_untouched():
    csqa = get_task("commonsense_qa")
    spec = trainer.ExpertSpec.parse("c=commonsense_qa:test[200:]")
    items = train_experts.spec_items(csqa, spec)
    assert [it["_index"] for it in items] == list(range(200, len(csqa.load("test"))))
    with pytest.raises(UserError, match="is empty"):
        train_experts.spec_items(csqa, trainer.ExpertSpec.parse("c=commonsense_qa:dev[500:]"))
    sources = {s.task for s in trainer.QUALITY_EXPERTS}
    assert set(trainer.DEMO_EXPERTS) <= set(trainer.QUALITY_EXPERTS) and len(sources) == len(trainer.QUALITY_EXPERTS) >= 6
    assert not sources & {"arc_e", "piqa", "hellaswag", trainer.DEMO_TARGET}
    assert all(s.held_out() == ("test", 0, 200) for s in trainer.QUALITY_EXPERTS)
