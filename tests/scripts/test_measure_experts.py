"""The paired statistic behind docs/EXPERTS.md, against numpy."""
import numpy as np

from scripts.measure_experts import paired


def test_paired_gain_and_standard_error_match_numpy():
    rs = np.random.RandomState(0)
    base, expert = rs.randint(0, 2, 200).astype(float), rs.randint(0, 2, 200).astype(float)
    gain, se = paired(list(base), list(expert))
    d = expert - base
    assert np.isclose(gain, d.mean()) and np.isclose(se, d.std(ddof=1) / np.sqrt(200))


def test_held_out_reads_keep_the_kept_then_the_passing_candidates_and_none_when_screening_only():
    from scripts.measure_experts import held_out_reads

    screened = [{"expert": "a", "gain": 0.07, "paired_se": 0.03},   # 2.3 SE: passes
                {"expert": "b", "gain": 0.05, "paired_se": 0.03},   # 1.7 SE: does not
                {"expert": "c", "gain": -0.1, "paired_se": 0.01}]
    assert held_out_reads(["k"], screened, screen_only=False) == ["k", "a"]
    assert held_out_reads(["k"], screened, screen_only=True) == []
    # a replication screens a source and keeps it whatever the screen says: its test items are read once
    assert held_out_reads(["a"], screened, screen_only=False) == ["a"]


def test_screen_only_with_kept_is_one_error_line(capsys):
    import pytest

    from scripts.measure_experts import main

    with pytest.raises(SystemExit) as e:
        main(["POOL", "--kept", "boolq", "--screen_only"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--screen_only" in err and "--kept" in err


def test_pool_max_rank_reads_the_adapters_ranks_and_never_goes_below_the_evaluator_default(tmp_path):
    import json

    from scripts.measure_experts import pool_max_rank

    for name, r in (("mmlu", 32), ("arc_c", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": r}))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"")  # only its presence is checked here
    assert pool_max_rank(str(tmp_path), ["mmlu", "arc_c"]) == 32
    assert pool_max_rank(str(tmp_path), ["arc_c"]) == 16


def test_a_missing_adapter_is_one_error_line_naming_it_before_any_engine_starts(tmp_path, capsys):
    from scripts.measure_experts import main

    assert main([str(tmp_path), "--candidates", "mmlu", "--screen_only"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "mmlu") in err[0], err
