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


def test_screen_only_with_kept_is_one_error_line(capsys):
    import pytest

    from scripts.measure_experts import main

    with pytest.raises(SystemExit) as e:
        main(["POOL", "--kept", "boolq", "--screen_only"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--screen_only" in err and "--kept" in err
