"""A small real `genome run`: SmolLM2-135M, real PEFT experts, the real vLLM evaluator process (slow)."""
from __future__ import annotations

import json

import pytest

from scripts import cli


@pytest.mark.slow
def test_small_real_run_wires_everything(tmp_path, make_peft_adapter, model_path, capsys):
    experts = tmp_path / "experts"
    for i in range(3):  # distinct random rank-8 q/v experts: enough to breed from
        make_peft_adapter(experts / f"expert{i}", rank=8, alpha=16, seed=i, scale=3.0)
    # provenance: expert0 "was trained on" 10 arc_c test items (let through by --allow-overlap), expert1's file is
    # broken, expert2 has none
    from evaluators import provenance as pv
    from evaluators.tasks import get_task

    pv.write_provenance(experts / "expert0", [pv.make_entry("arc_c", None, "test", get_task("arc_c").load("test")[:10])])
    (experts / "expert1" / pv.PROVENANCE_FILE).write_text("not json")
    out = tmp_path / "run"
    argv = ["run", "--tasks", "arc_c", "--test_tasks", "arc_c", "mmlu", "--model_path", str(model_path),
            "--lora_dir", str(experts), "--population_size", "4", "--max_iter", "2", "--n_dev", "16",
            "--n_test", "16", "--ensemble_k", "3", "--elite_percent", "0.25", "--seed", "3",
            "--output_dir", str(out), "--quiet", "--allow-overlap"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "evolved best" in printed and "ensemble k=1" in printed

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in recs] == [0, 1, 2]
    assert all(r["time"]["scoring"] > 0 for r in recs)
    assert recs[1]["evaluated"]["cached"] >= 1  # the elite is not re-scored
    result = json.loads((out / "result.json").read_text())
    prov = result["provenance"]
    assert prov["allow_overlap"] is True
    assert prov["adapters"] == {"expert0": "known", "expert1": "unparseable", "expert2": "unknown"}
    assert [(o["expert"], o["task"], o["split"], o["n_overlap"]) for o in prov["overlaps"]] == [
        ("expert0", "arc_c", "test", 10)]
    assert result["unseen_tasks"] == ["mmlu"]
    assert result["n_dev"] == {"arc_c": 16} and result["n_test"] == {"arc_c": 16, "mmlu": 16}
    assert result["best"]["dev_fitness"] == pytest.approx(max(r["best_ever"] for r in recs))
    assert set(result["best"]["test_scores"]) == {"arc_c", "mmlu"}
    ens = result["ensembles"]
    assert [e["k"] for e in ens] == list(range(1, len(ens) + 1)) and 1 <= len(ens) <= 3
    assert result["timings_s"]["evaluator_start"] > 0

    # independent anchor: transformers + peft (fp32) on the exported best adapter reproduces its dev fitness
    from evaluators.reference import answer_with_transformers
    from evaluators.tasks import get_task

    task = get_task("arc_c", formatter=str(model_path))
    items = task.load("dev", 16)
    responses = answer_with_transformers(str(model_path), task.build_requests(items, task.mode),
                                         adapter=str(out / "best_adapter"))
    ref = task.score(items, responses, task.mode).score
    assert abs(ref - result["best"]["dev_fitness"]) <= 1 / 16 + 1e-9  # bf16 engine vs fp32: one close call at most
    png = (out / "fitness.png").read_bytes()
    assert png[:4] == b"\x89PNG"
