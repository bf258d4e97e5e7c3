"""Statistics of accuracies measured on the same items: the spread over seeds, paired differences and their
bootstrap intervals. Pure numpy; per-item scores are 0/1 correctness (or any score in [0, 1]).

Why paired: two adapters scored on the same 200 items share the items' difficulty, so the standard error of their
difference is much smaller than the two accuracies' own errors (about 3 points each at 200 items) combined.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["mean_sd", "paired_difference", "paired_bootstrap", "binomial_se"]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1) of per-seed values; sd is 0.0 for one value."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("values: empty")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent items."""
    return math.sqrt(max(acc * (1.0 - acc), 0.0) / max(n, 1))


def _per_item(a) -> np.ndarray:
    """(n,) or (seeds, n) per-item scores -> (n,) per-item mean over seeds."""
    x = np.asarray(a, np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"per-item scores must be (n,) or (seeds, n) with n >= 1, got shape {np.shape(a)}")
    return x


def paired_difference(a, b) -> tuple[float, float]:
    """Mean and standard error of a - b over items. a, b: (n,) per-item scores, or (seeds, n) (averaged over seeds
    first: the seeds share the items)."""
    d = _per_item(a) - _per_item(b)
    if d.size < 2:
        return float(d.mean()), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def paired_bootstrap(a, b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, low, high): the percentile bootstrap interval of mean(a - b) over items, resampling items
    with replacement (the same draw for a and b: paired). a, b: (n,) or (seeds, n) per-item scores on the same items
    in the same order. Deterministic for a given seed."""
    d = _per_item(a) - _per_item(b)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(d.mean()), float(lo), float(hi)
