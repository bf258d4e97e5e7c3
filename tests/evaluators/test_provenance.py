"""evaluators.provenance: item identity, the provenance file (atomic write, known / unknown / unparseable), and
overlap finding on the real task files. References: hashlib on hand-written texts, the task files' own items."""
from __future__ import annotations

import hashlib
import json

import pytest

from evaluators import provenance as pv
from evaluators.tasks import get_task, list_tasks


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_item_text_is_passage_and_question_lowercased_with_whitespace_collapsed():
    item = {"passage": "  The Texans\tWON.\n\n", "question": "Who  won?", "choices": {"A": "x", "B": "y"}}
    assert pv.item_text(item) == "the texans won. who won?"
    assert pv.item_text({"question": "Ünïcode\u00a0 Q?"}) == "ünïcode q?"
    assert pv.item_sha256(item) == _sha("the texans won. who won?")
    # the choices and the answer do not identify an item: the same question with other options is the same item
    assert pv.item_sha256({**item, "choices": {"A": "z"}, "answer": "A"}) == pv.item_sha256(item)
    with pytest.raises(ValueError, match=r"item \(id 'x1'\) has neither a 'passage' nor a 'question'"):
        pv.item_text({"id": "x1", "answer": "3"})


def test_write_then_read_round_trips_atomically(tmp_path):
    task = get_task("arc_c")
    items = task.load("test")[10:15]
    entry = pv.make_entry("arc_c", task.path, "test", items)
    assert entry["indices"] == [10, 11, 12, 13, 14]
    assert entry["file_sha256"] == hashlib.sha256(open(task.path, "rb").read()).hexdigest()
    q = " ".join(items[0]["question"].lower().split())
    assert entry["item_sha256"][0] == _sha(q)
    pv.write_provenance(tmp_path, [entry])
    assert sorted(p.name for p in tmp_path.iterdir()) == [pv.PROVENANCE_FILE]  # no temp file left behind
    got = pv.read_provenance(tmp_path)
    assert got == {"status": "known", "entries": [entry], "error": None}


def test_unknown_and_unparseable(tmp_path):
    assert pv.read_provenance(tmp_path) == {"status": "unknown", "entries": [], "error": None}
    f = tmp_path / pv.PROVENANCE_FILE
    good = pv.make_entry("t", None, "test", [{"question": "q"}])
    cases = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"format": "other/9", "entries": []}), "unknown format 'other/9'"),
        (json.dumps({"format": pv.FORMAT, "entries": {}}), "'entries' must be a list"),
        (json.dumps({"format": pv.FORMAT, "entries": [{**good, "item_sha256": ["abc"]}]}),
         r"entries\[0\]: 'item_sha256' must be a list of sha256"),
        (json.dumps({"format": pv.FORMAT, "entries": [{**good, "indices": [0, 1]}]}), "2 indices but 1 item hashes"),
        (json.dumps({"format": pv.FORMAT, "entries": [{"task": "t"}]}), r"entries\[0\] lacks 'file'"),
    ]
    import re

    for text, why in cases:
        f.write_text(text)
        got = pv.read_provenance(tmp_path)
        assert got["status"] == "unparseable" and got["entries"] == [], text
        assert str(f) in got["error"] and re.search(why, got["error"]), (text, got["error"])


def test_write_refuses_bad_entries_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"entries\[0\] lacks 'split'"):
        pv.write_provenance(tmp_path, [{"task": "t", "file": None, "file_sha256": None, "indices": [],
                                        "item_sha256": []}])
    with pytest.raises(ValueError, match="adapter_dir .* not a folder"):
        pv.write_provenance(tmp_path / "nope", [])
    assert list(tmp_path.iterdir()) == []


def test_find_overlaps_names_expert_task_split_and_items(tmp_path):
    arc, mmlu = get_task("arc_c"), get_task("mmlu")
    arc_test, arc_dev, mmlu_test = arc.load("test"), arc.load("dev"), mmlu.load("test")
    leaky, clean, unknown, broken = (tmp_path / n for n in ("leaky", "clean", "unknown", "broken"))
    for d in (leaky, clean, unknown, broken):
        d.mkdir()
    # leaky trained on mmlu test and on 7 arc_c test items (copied into its own file: found by text, not by file)
    pv.write_provenance(leaky, [pv.make_entry("mmlu", mmlu.path, "test", mmlu_test),
                                pv.make_entry("mine", None, "train", arc_test[100:107])])
    pv.write_provenance(clean, [pv.make_entry("mmlu", mmlu.path, "test", mmlu_test)])
    (broken / pv.PROVENANCE_FILE).write_text(json.dumps({"format": "x", "entries": []}))
    found = pv.find_overlaps({"leaky": leaky, "clean": clean, "unknown": unknown, "broken": broken},
                             {"arc_c": {"dev": arc_dev, "test": arc_test}})
    assert found == [{"expert": "leaky", "adapter": str(leaky), "task": "arc_c", "split": "test", "n_overlap": 7,
                      "n_items": len(arc_test), "indices": list(range(100, 107)), "trained_on": ["mine:train"]}]
    msg = pv.overlap_message(found + [dict(found[0], expert="other")])
    assert "\n" not in msg
    assert msg == (f"expert 'leaky' was trained on 7 of the {len(arc_test)} test items of task 'arc_c' (its training "
                   "data: mine:train) (and 1 more expert/task/split overlap)")


def test_no_built_in_task_repeats_a_dev_item_in_its_test_split(tmp_path):
    """The shipped files pass the engine's own check: an expert trained on a task's dev split does not overlap its
    test split (DROP's copy dropped the 4 test items that repeated dev items)."""
    found = []
    for name in list_tasks():
        task = get_task(name)
        if getattr(task, "path", None) is None:
            continue
        d = tmp_path / name
        d.mkdir()
        pv.write_provenance(d, [pv.make_entry(name, task.path, "dev", task.load("dev"))])
        found += pv.find_overlaps({name: d}, {name: {"test": task.load("test")}})
    assert found == []
    assert len(get_task("drop").load("test")) == 996
