"""The paired statistic behind docs/EXPERTS.md, against numpy."""
import numpy as np

from scripts.measure_experts import paired


def test_paired_gain_and_standard_error_match_numpy():
    rs = np.random.RandomState(0)
    base, expert = rs.randint(0, 2, 200).astype(float), rs.randint(0, 2, 200).astype(float)
    gain, se = paired(list(base), list(expert))
    d = expert - base
    assert np.isclose(gain, d.mean()) and np.isclose(se, d.std(ddof=1) / np.sqrt(200))
