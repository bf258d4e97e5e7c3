"""`genome run` checks the experts' provenance before any work: an expert trained on dev/test items of a target or
test task is refused in one line (exit 1, nothing written); --allow-overlap passes the check (shown here by the run
reaching its next, distinct check: toy experts do not fit SmolLM2); unknown and unparseable provenance are recorded
in result.json (a synthetic run: no LLM), the unparseable one with one warning line. The trainer writes the file."""
from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli
from evaluators import provenance as pv
from evaluators.tasks import get_task


@pytest.fixture
def pool(tmp_path, toy):
    """lora_dir with toy experts e0, e1, e2 (no provenance yet)."""
    root = tmp_path / "experts"
    for i in range(3):
        toy.write(root / f"e{i}", toy.cfg(), toy.tensors(seed=i))
    return root


def _trained_on(folder, task: str, split: str, items):
    pv.write_provenance(folder, [pv.make_entry(task, get_task(task).path, split, items)])


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("genome: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags,task,split,n,total", [
    (["--tasks", "mmlu", "--test_tasks", "arc_c"], "arc_c", "test", 40, 1000),  # a test task's test items
    (["--tasks", "arc_c"], "arc_c", "dev", 200, 200),                         # the target's dev items
])
def test_an_expert_trained_on_a_run_task_is_refused(pool, tmp_path, capsys, model_path, flags, task, split, n, total):
    items = get_task(task).load(split)
    _trained_on(pool / "e1", task, split, items[:n] if split == "test" else items)
    _trained_on(pool / "e0", "mmlu", "test", [])  # known, trained on nothing of the run's tasks
    out = tmp_path / "run"
    rc, _, err = run_cli(["run", *flags, "--lora_dir", str(pool), "--model_path", str(model_path),
                          "--output_dir", str(out)], capsys)
    assert rc == 1
    assert err.strip().count("\n") == 0, err  # one line, no warning, no traceback
    line = _one_error_line(err)
    assert (f"expert 'e1' was trained on {n} of the {total} {split} items of task '{task}'" in line
            and "--allow-overlap" in line), line
    assert not out.exists()


def test_allow_overlap_passes_the_check(pool, tmp_path, capsys, model_path):
    _trained_on(pool / "e2", "arc_c", "test", get_task("arc_c").load("test")[:5])
    out = tmp_path / "run"
    rc, _, err = run_cli(["run", "--tasks", "arc_c", "--lora_dir", str(pool), "--model_path", str(model_path),
                          "--output_dir", str(out), "--allow-overlap"], capsys)
    assert rc == 1  # the next check refuses the toy experts: proof that the provenance check let the run through
    assert "genome: warning: --allow-overlap: expert 'e2' was trained on 5 of the 1000 test items" in err
    assert "adapters made for another model?" in _one_error_line(err)
    assert not out.exists()


def test_unparseable_provenance_is_reported_and_not_trusted(pool, tmp_path, capsys, model_path):
    # would be an overlap if it were trusted: the right hashes, under a format we do not know
    entry = pv.make_entry("arc_c", None, "test", get_task("arc_c").load("test"))
    (pool / "e0" / pv.PROVENANCE_FILE).write_text(json.dumps({"format": "genome-provenance/0", "entries": [entry]}))
    rc, _, err = run_cli(["run", "--tasks", "arc_c", "--lora_dir", str(pool), "--model_path", str(model_path),
                          "--output_dir", str(tmp_path / "run")], capsys)
    assert rc == 1 and "adapters made for another model?" in _one_error_line(err)
    warnings = [ln for ln in err.splitlines() if ln.startswith("genome: warning: ")]
    assert warnings == [f"genome: warning: expert 'e0': provenance not trusted ({pool / 'e0' / pv.PROVENANCE_FILE}: "
                        "unknown format 'genome-provenance/0' (expected 'genome-provenance/1'))"]


def test_result_json_records_each_experts_provenance(pool, tmp_path, capsys):
    _trained_on(pool / "e0", "mmlu", "test", get_task("mmlu").load("test")[:3])
    (pool / "e2" / pv.PROVENANCE_FILE).write_text("{truncated")
    out = tmp_path / "run"
    rc, _, err = run_cli(["run", "--tasks", "synthetic", "--lora_dir", str(pool), "--population_size", "3",
                          "--max_iter", "1", "--cross_method", "linear", "--combine_method", "linear",
                          "--output_dir", str(out), "--quiet"], capsys)
    assert rc == 0, err
    assert sum(ln.startswith("genome: warning: expert 'e2': provenance not trusted") for ln in err.splitlines()) == 1
    prov = json.loads((out / "result.json").read_text())["provenance"]
    assert prov["allow_overlap"] is False and prov["overlaps"] == []
    assert prov["adapters"] == {"e0": "known", "e1": "unknown", "e2": "unparseable"}
    assert list(prov["unparseable"]) == ["e2"] and "not valid JSON" in prov["unparseable"]["e2"]


def test_the_trainer_writes_what_each_expert_was_trained_on(tmp_path, model_path):
    from genome_jax.models import trainer
    from scripts import train_experts

    specs = [trainer.ExpertSpec("m", "mmlu", "test"), trainer.ExpertSpec("h", "hellaswag", "dev"),
             trainer.ExpertSpec.parse("c=commonsense_qa:test[200:]")]
    tasks = [get_task("mmlu"), get_task("hellaswag"), get_task("commonsense_qa")]
    for s in specs:
        (tmp_path / s.name).mkdir()
    train_experts.write_provenance(tmp_path, str(model_path), specs)
    for s, t in zip(specs, tasks):
        got = pv.read_provenance(tmp_path / s.name)
        items = t.load(s.split)[s.start:s.stop]  # exactly the training slice
        assert got["status"] == "known" and len(got["entries"]) == 1
        e = got["entries"][0]
        assert (e["task"], e["split"], e["file"]) == (t.name, s.split, t.path)
        assert e["indices"] == list(range(s.start, s.start + len(items)))
        assert e["item_sha256"] == [pv.item_sha256(it) for it in items]
