"""evaluators.stats against independent references: numpy's own formulas, scipy.stats.bootstrap and the normal
approximation."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import scipy.stats

from evaluators.stats import binomial_se, mean_sd, paired_bootstrap, paired_difference


def test_mean_sd_matches_statistics_module():
    xs = [0.61, 0.58, 0.66]
    m, sd = mean_sd(xs)
    assert m == pytest.approx(statistics.mean(xs))
    assert sd == pytest.approx(statistics.stdev(xs))
    assert mean_sd([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_sd([])


def test_binomial_se():
    assert binomial_se(0.5, 200) == pytest.approx(math.sqrt(0.25 / 200))
    assert binomial_se(1.0, 10) == 0.0


def test_paired_difference_is_the_se_of_the_per_item_differences():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)
    b = np.where(rng.random(200) < 0.8, a, 1 - a)  # 80% of items agree: pairing matters
    m, se = paired_difference(a, b)
    d = a - b
    assert m == pytest.approx(d.mean())
    assert se == pytest.approx(scipy.stats.sem(d))
    # far smaller than the unpaired error of the two accuracies
    assert se < math.hypot(binomial_se(a.mean(), 200), binomial_se(b.mean(), 200))


def test_seeds_are_averaged_per_item_first():
    a = np.array([[1, 0, 1, 1], [1, 1, 0, 1], [0, 0, 1, 1]], float)
    b = np.array([0, 0, 1, 0], float)
    m, _ = paired_difference(a, b)
    assert m == pytest.approx((a.mean(0) - b).mean())


def test_bootstrap_interval_agrees_with_scipy_and_the_normal_approximation():
    rng = np.random.default_rng(2)
    a = (rng.random(400) < 0.62).astype(float)
    b = np.where(rng.random(400) < 0.7, a, (rng.random(400) < 0.5).astype(float))
    m, lo, hi = paired_bootstrap(a, b, n_boot=4000, seed=3)
    ref = scipy.stats.bootstrap((a - b,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                                random_state=np.random.default_rng(4))
    assert m == pytest.approx((a - b).mean())
    # two Monte Carlo estimates of the same interval: equal within the resampling noise
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.006)
    _, se = paired_difference(a, b)
    assert lo == pytest.approx(m - 1.96 * se, abs=0.008)
    assert hi == pytest.approx(m + 1.96 * se, abs=0.008)


def test_bootstrap_is_deterministic_and_excludes_zero_only_for_a_real_gain():
    a = np.ones(200)
    b = np.r_[np.zeros(40), np.ones(160)]  # a is right on 40 more items
    m, lo, hi = paired_bootstrap(a, b)
    assert (m, lo, hi) == paired_bootstrap(a, b)
    assert m == pytest.approx(0.2) and lo > 0.1
    m, lo, hi = paired_bootstrap(b, b)
    assert (m, lo, hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b, level=1.0)
