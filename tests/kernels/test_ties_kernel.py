"""The fused TIES kernel: Pallas (interpret mode on CPU) == pure-jnp reference bit for bit; reference == PEFT
(normalize="count") and == mergekit's definition written in numpy (normalize="weight" / "none")."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from kernels import magnitude_threshold, ties_combine, ties_merge, ties_merge_pallas, ties_merge_reference

MODES = [(m, n) for m in ("total", "frequency") for n in ("count", "weight", "none")]


def _case(seed=0, P=6, n=1000, C=5, K=3, density=0.3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((P, n)).astype(np.float32)
    cuts = np.asarray(magnitude_threshold(x, int(density * n)))
    idx = rng.integers(0, P, (C, K)).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (C, K)).astype(np.float32)
    return x, cuts, idx, w


def _mergekit_numpy(parents, w, cuts, msm, normalize):
    """mergekit's GTA ties from its definition: weighted deltas elect the sign; divide by agreeing weight."""
    t = np.where(np.abs(parents) >= cuts[:, None], parents, 0).astype(np.float32)
    wd = t * w[:, None]
    score = wd.sum(0) if msm == "total" else np.sign(wd).sum(0)
    majority = np.where(score >= 0, 1.0, -1.0)
    agree = np.sign(wd) == majority
    mixed = (wd * agree).sum(0)
    if normalize == "none":
        return mixed
    div = (w[:, None] * agree).sum(0)
    return mixed / np.where(div == 0, 1.0, div)


@pytest.mark.parametrize("msm,normalize", MODES)
@pytest.mark.parametrize("block", [128, 256])
def test_pallas_interpret_equals_reference_exactly(msm, normalize, block):
    x, cuts, idx, w = _case(K=3)  # n = 1000 is not a multiple of the block: the padding path
    ref = np.asarray(jax.jit(lambda *a: ties_merge_reference(*a, majority_sign_method=msm, normalize=normalize))(
        x, cuts, idx, w))
    pal = np.asarray(ties_merge_pallas(x, cuts, idx, w, majority_sign_method=msm, normalize=normalize,
                                       block=block, interpret=True))
    np.testing.assert_array_equal(pal, ref)


def test_dispatch_impls_agree():
    x, cuts, idx, w = _case(seed=3, K=2, n=512)
    a = np.asarray(ties_merge(x, cuts, idx, w, impl="jnp"))
    b = np.asarray(ties_merge(x, cuts, idx, w, impl="pallas_interpret"))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="impl"):
        ties_merge(x, cuts, idx, w, impl="cuda")


@pytest.mark.parametrize("msm", ["total", "frequency"])
@pytest.mark.parametrize("K", [2, 3])
def test_reference_equals_peft_ties(msm, K):
    density = 0.3
    x, cuts, idx, w = _case(seed=K, K=K, density=density)
    ref = np.asarray(ties_merge_reference(x, cuts, idx, w, majority_sign_method=msm, normalize="count"))
    for c in range(idx.shape[0]):
        expect = peft_ties([torch.from_numpy(x[i]) for i in idx[c]], torch.from_numpy(w[c]), density, msm).numpy()
        np.testing.assert_allclose(ref[c], expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("msm,normalize", [m for m in MODES if m[1] != "count"])
def test_reference_equals_mergekit_definition(msm, normalize):
    x, cuts, idx, w = _case(seed=7, K=3)
    ref = np.asarray(ties_merge_reference(x, cuts, idx, w, majority_sign_method=msm, normalize=normalize))
    for c in range(idx.shape[0]):
        expect = _mergekit_numpy(x[idx[c]], w[c], cuts[idx[c]], msm, normalize)
        np.testing.assert_allclose(ref[c], expect, rtol=1e-6, atol=1e-7)


def test_zero_entries_never_count_as_agreeing():
    """Two trimmed parents, one zero: the survivor keeps its full value under count-normalisation (divisor 1)."""
    a = np.array([2.0, 0.0, -1.0, 0.0], np.float32)
    b = np.array([0.0, 3.0, 0.0, 0.0], np.float32)
    out = np.asarray(ties_combine([a, b], [1.0, 1.0]))
    np.testing.assert_array_equal(out, [2.0, 3.0, -1.0, 0.0])


def test_sign_election_total_vs_frequency():
    # three parents at one entry: +1, +1, -5. "total" elects -, "frequency" elects +.
    p = [np.array([v], np.float32) for v in (1.0, 1.0, -5.0)]
    w = [1.0, 1.0, 1.0]
    assert float(ties_combine(p, w, majority_sign_method="total")[0]) == -5.0
    assert float(ties_combine(p, w, majority_sign_method="frequency")[0]) == 1.0


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="majority_sign_method"):
        ties_combine([np.ones(2)], [1.0], majority_sign_method="max")
    with pytest.raises(ValueError, match="normalize"):
        ties_combine([np.ones(2)], [1.0], normalize="mean")
