"""Run reports: metrics.jsonl, summary line, fitness.png, atomic JSON."""
from __future__ import annotations

import json
import math

import pytest

from genome_jax import reporting


def test_fitness_stats_ignore_failed_individuals():
    s = reporting.fitness_stats([0.2, float("nan"), 0.6, 0.4])
    assert s == {"best": 0.6, "mean": pytest.approx(0.4), "worst": 0.2}
    assert reporting.fitness_stats([float("nan")]) == {"best": None, "mean": None, "worst": None}


def test_metrics_append_read_truncate(tmp_path):
    for g in range(4):
        reporting.append_metrics(tmp_path, {"generation": g, "best": g / 10})
    with open(tmp_path / reporting.METRICS, "a") as f:
        f.write('{"generation": 4, "be')  # a torn line from a killed writer
    assert [r["generation"] for r in reporting.read_metrics(tmp_path)] == [0, 1, 2, 3]
    reporting.truncate_metrics(tmp_path, 1)
    assert [r["generation"] for r in reporting.read_metrics(tmp_path)] == [0, 1]
    assert (tmp_path / reporting.METRICS).read_text().endswith("\n")
    assert not list(tmp_path.glob(".*tmp*"))


def test_json_has_no_nan(tmp_path):
    reporting.write_json_atomic(tmp_path / "r.json", {"x": reporting.clean_float(float("nan")), "y": 1.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": None, "y": 1.5}
    with pytest.raises(ValueError):
        reporting.write_json_atomic(tmp_path / "bad.json", {"x": math.inf})
    assert not (tmp_path / "bad.json").exists()


def test_summary_line_has_fitness_spread_and_time_split():
    line = reporting.summary_line({"generation": 3, "best": 0.61234, "mean": 0.5, "worst": None,
                                   "time": {"operators": 0.25, "export": 1.5, "scoring": 12.0},
                                   "evaluated": {"scored": 5, "cached": 2}}, max_iter=10)
    assert line.startswith("gen 3/10  best 0.6123  mean 0.5000  worst   n/a ")
    assert "ops 0.25s  export 1.50s  score 12.00s  (5 scored, 2 cached)" in line
    assert "\n" not in line


def test_plot_is_a_png_with_both_panels(tmp_path):
    from matplotlib.image import imread

    recs = [{"generation": g, "best": 0.3 + g / 20, "mean": 0.2 + g / 25, "worst": 0.1} for g in range(6)]
    reporting.plot_fitness(recs, tmp_path / "a.png")
    reporting.plot_fitness(recs, tmp_path / "b.png", test_bars={"best initial expert": 0.3, "evolved best": 0.4,
                                                                "ensemble k=2": 0.41, "skipped": None},
                           reference={"best initial expert (dev)": 0.35})
    a, b = imread(tmp_path / "a.png"), imread(tmp_path / "b.png")
    assert a.shape[1] < b.shape[1]  # the test bars add a second panel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files left
