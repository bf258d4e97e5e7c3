"""`genome bench quality`: the tables against numpy on constructed scores, bad input, and (slow) `--quick` for real."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli

from evaluators.provenance import make_entry, write_provenance
from evaluators.tasks import get_task
from scripts import bench_quality

CFG = dict(bench_quality.DEFAULTS, seeds=3, ensemble_k=2, n_dev=4, n_test=6)


def _task(per_sample, ids=None, score=None):
    per_sample = [float(x) for x in per_sample]
    return {"score": float(np.mean(per_sample)) if score is None else score, "per_sample": per_sample,
            "ids": ids or [f"test[{i}]" for i in range(len(per_sample))]}


def _baselines():
    # expert:a is best on dev but worse on test than expert:b: the bench must pick a (dev only)
    rows = {"base": ([0, 1, 0, 0], [1, 0, 0, 1, 0, 0]),
            "expert:a": ([1, 1, 1, 0], [1, 0, 0, 1, 0, 1]),
            "expert:b": ([1, 0, 0, 0], [1, 1, 1, 1, 0, 1]),
            "uniform_merge": ([0, 1, 1, 0], [1, 1, 0, 1, 0, 0]),
            "ties_merge": ([0, 0, 1, 0], [0, 0, 0, 1, 0, 0])}
    zs = {"piqa": [1, 0, 1, 0, 1, 0]}
    return {"rows": {k: {"dev": _task(d), "test": _task(t)} for k, (d, t) in rows.items()},
            "zero_shot": {"base": {"piqa": _task(zs["piqa"])}, "expert:a": {"piqa": _task([1, 1, 1, 0, 1, 0])},
                          "expert:b": {"piqa": _task([0, 0, 0, 0, 0, 0])}},
            "chance": 0.25}


def _run(test, piqa, dev_fitness, ens):
    ids = {"arc_e": [f"test[{i}]" for i in range(6)], "piqa": [f"test[{i}]" for i in range(6)]}
    return {"best": {"dev_fitness": dev_fitness, "test_per_sample": {"arc_e": test, "piqa": piqa}, "test_ids": ids},
            "unseen_tasks": ["piqa"],
            "ensembles": [{"k": k + 1, "test_scores": {"arc_e": e}} for k, e in enumerate(ens)]}


def test_summary_numbers_against_numpy():
    runs = {"genome_plus": [_run([1, 1, 1, 1, 0, 1], [1, 1, 1, 0, 1, 0], 0.8, [0.8, 0.7]),
                            _run([1, 1, 0, 1, 1, 1], [1, 0, 1, 0, 1, 1], 0.75, [0.6, 0.7]),
                            _run([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], 0.9, [0.9, 0.8])]}
    s = bench_quality.summarise(CFG, "arc_e", _baselines(), runs)
    assert s["best_expert"] == "expert:a"  # best on dev (0.75), although expert:b is better on test
    rows = {r["row"]: r for r in s["rows"]}
    assert rows["best expert on dev (a)"]["test"] == pytest.approx(3 / 6)
    evo = np.array([r["best"]["test_per_sample"]["arc_e"] for r in runs["genome_plus"]], float)
    per_seed = evo.mean(axis=1)
    r = rows["genome_plus evolved best (dev-chosen)"]
    assert r["test"] == pytest.approx(per_seed.mean()) and r["sd"] == pytest.approx(per_seed.std(ddof=1))
    assert r["dev"] == pytest.approx(np.mean([0.8, 0.75, 0.9]))
    assert rows["genome_plus ensemble top-2 (dev-ranked)"]["test"] == pytest.approx(np.mean([0.7, 0.7, 0.8]))
    a = np.array([1, 0, 0, 1, 0, 1], float)
    p = s["paired"]["genome_plus"]["expert:a"]
    assert p["diff"] == pytest.approx((evo.mean(axis=0) - a).mean())
    assert p["per_seed"] == pytest.approx(list((evo - a).mean(axis=1)))
    assert p["ci95"][0] <= p["diff"] <= p["ci95"][1]
    z = s["zero_shot"]["genome_plus"]["piqa"]
    assert z["base"] == pytest.approx(0.5) and z["best_expert"] == pytest.approx(4 / 6)  # expert:a, the dev choice
    md = bench_quality.markdown(CFG, [s])
    assert "| best expert on dev (a) | 75.0 | 50.0 |" in md
    assert "chance 25.0%" in md
    assert f"vs expert:a: {100 * p['diff']:+.1f} points" in md


def test_selection_gap_and_plots_against_numpy(tmp_path):
    runs = {"genome_plus": [_run([1, 1, 1, 1, 0, 1], [1] * 6, 0.8, [0.8, 0.7]),
                            _run([1, 0, 0, 1, 1, 0], [1] * 6, 0.9, [0.6, 0.7])]}
    s = bench_quality.summarise(CFG, "arc_e", _baselines(), runs)
    base = _baselines()["rows"]
    base_gap = np.mean([np.mean(d["dev"]["per_sample"]) - np.mean(d["test"]["per_sample"]) for d in base.values()])
    evo_gap = np.mean([0.8 - 5 / 6, 0.9 - 3 / 6])
    g = s["selection_gap"]
    assert g["baselines_mean"] == pytest.approx(base_gap) and g["evolved_mean"] == pytest.approx(evo_gap)
    assert g["excess"] == pytest.approx(evo_gap - base_gap)
    assert [p["label"] for p in s["dev_test"]] == [*base, "genome_plus s0", "genome_plus s1"]
    md = bench_quality.markdown(CFG, [s])
    assert f"overstates its test score by {100 * (evo_gap - base_gap):+.1f} points" in md
    bench_quality.plot_dev_test([s], tmp_path / "dt.png")
    recs = [{"generation": 0, "best": 0.5, "mean": 0.4}, {"generation": 1, "best": 0.6, "mean": 0.5}]
    bench_quality.plot_curves({"arc_e": {"genome_plus s0": recs}}, {"arc_e": 0.55}, tmp_path / "fc.png")
    for f in ("dt.png", "fc.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # written atomically: no temp file left


def test_other_test_items_are_refused():
    run = _run([1] * 6, [1] * 6, 0.8, [0.8, 0.8])
    run["best"]["test_ids"]["arc_e"] = [f"test[{i + 1}]" for i in range(6)]
    with pytest.raises(Exception, match="other test items"):
        bench_quality.summarise(CFG, "arc_e", _baselines(), {"genome_plus": [run]})


@pytest.fixture(scope="module")
def pools(tmp_path_factory, make_peft_adapter):
    """Two real adapters trained on nothing that touches arc_e (no provenance), one that says it was trained on
    arc_e, and a pool of one."""
    root = tmp_path_factory.mktemp("pools")
    items = get_task("arc_e").load("dev", 3)
    for name, seed in (("two", 0), ("overlap", 1)):
        for j in range(2):
            make_peft_adapter(root / name / f"e{j}", rank=2, alpha=4, seed=seed * 10 + j)
    write_provenance(root / "overlap" / "e1", [make_entry("arc_e", get_task("arc_e").path, "dev", items)])
    make_peft_adapter(root / "one" / "e0", rank=2, alpha=4, seed=7)
    return root


@pytest.mark.parametrize("case,argv,message", [
    ("unknown target", ["--targets", "arc_x"], "unknown task 'arc_x'"),
    ("seeds", ["--seeds", "0"], "--seeds must be at least 1, got 0"),
    ("overlap", ["--lora_dir", "{overlap}"], "target 'arc_e' is a task expert 'e1' was trained on"),
    ("one expert", ["--lora_dir", "{one}"], "the expert pool has 1 expert(s); the bench needs at least 2"),
    ("no folder", ["--lora_dir", "{missing}"], "not a folder"),
])
def test_bad_input_one_line_exit_1_nothing_written(pools, tmp_path, capsys, model_path, case, argv, message):
    out = tmp_path / "bench"
    argv = [a.format(overlap=pools / "overlap", one=pools / "one", missing=pools / "missing") for a in argv]
    rc, stdout, err = run_cli(["bench", "quality", "--quick", "--targets", "arc_e", "--model_path", str(model_path),
                               "--output_dir", str(out), *argv], capsys)
    assert rc == 1, (stdout, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()


@pytest.mark.slow
def test_quick_end_to_end_and_rerun_reads_back(tmp_path, capsys, model_path):
    out = tmp_path / "q"
    argv = ["bench", "quality", "--quick", "--quiet", "--model_path", str(model_path), "--output_dir", str(out)]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    res = json.loads((out / "quality.json").read_text())
    (s,) = res["targets"]
    base = json.loads((out / "baselines" / "arc_e.json").read_text())
    run = json.loads((out / "runs" / "arc_e" / "genome_plus-s0" / "result.json").read_text())
    rows = {r["row"]: r for r in s["rows"]}
    # the rows are the scored per-item results, and the run's own test score is its per-item mean
    for name in ("base", "uniform_merge", "ties_merge"):
        row = rows[name.replace("_", " ")]
        assert row["test"] == pytest.approx(np.mean(base["rows"][name]["test"]["per_sample"]))
    evo = np.array(run["best"]["test_per_sample"]["arc_e"])
    assert rows["genome_plus evolved best (dev-chosen)"]["test"] == pytest.approx(evo.mean())
    assert run["best"]["test_scores"]["arc_e"] == pytest.approx(evo.mean())
    ref = np.array(base["rows"]["uniform_merge"]["test"]["per_sample"])
    assert s["paired"]["genome_plus"]["uniform_merge"]["diff"] == pytest.approx((evo - ref).mean())
    assert "piqa" in s["zero_shot"]["genome_plus"]
    assert (out / "quality_arc_e.png").stat().st_size > 0 and "### arc_e" in (out / "quality.md").read_text()
    assert all((out / f"quality_{f}.png").stat().st_size > 0 for f in ("dev_vs_test", "fitness"))
    # the dev-vs-test scatter uses the evolved best's own dev fitness and per-item test mean
    (evo_pt,) = [p for p in s["dev_test"] if p["kind"] == "evolved"]
    assert evo_pt["dev"] == run["best"]["dev_fitness"] and evo_pt["test"] == pytest.approx(evo.mean())
    # a re-run reads everything back: nothing is rescored or rerun, the same table comes out
    stamp = (out / "runs" / "arc_e" / "genome_plus-s0" / "result.json").stat().st_mtime_ns
    rc2, stdout2, err2 = run_cli(argv, capsys)
    assert rc2 == 0, err2
    assert stdout2.split("files:")[0] == stdout.split("files:")[0]
    assert (out / "runs" / "arc_e" / "genome_plus-s0" / "result.json").stat().st_mtime_ns == stamp
    # another config in the same folder is refused with one line
    rc3, _, err3 = run_cli([*argv, "--seeds", "2"], capsys)
    assert rc3 == 1 and "holds a bench with another config (seeds: 1 -> 2)" in err3
