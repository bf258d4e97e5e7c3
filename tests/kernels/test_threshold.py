"""Exact k-th largest magnitude: the native radix select and the jnp counting select against np.sort."""
from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import native
from kernels import threshold as T

IMPLS = pytest.mark.parametrize("impl", ["native", "jnp"])


def _bf16ish(x):  # bf16-born weights: only 8 mantissa bits, so many exact ties
    return (x.astype(np.float32).view(np.int32) & ~0xFFFF).view(np.float32)


DISTS = {
    "gauss": lambda rng, s: rng.standard_normal(s),
    "ties_int": lambda rng, s: rng.integers(-3, 4, s).astype(float),
    "bf16": lambda rng, s: _bf16ish(rng.standard_normal(s)),
    "half_zero": lambda rng, s: np.where(rng.random(s) < 0.5, rng.standard_normal(s), 0.0),
    "wide_exponents": lambda rng, s: np.ldexp(rng.standard_normal(s), rng.integers(-30, 30, s)),
    "heavy_tail": lambda rng, s: rng.standard_t(2, s),
    "all_zero": lambda rng, s: np.zeros(s),
}


def _expected(x, k):
    srt = -np.sort(-np.abs(x), axis=-1)
    n = x.shape[-1]
    k = np.broadcast_to(np.clip(k, 0, n), x.shape[:-1])
    out = np.take_along_axis(srt, np.maximum(k - 1, 0)[..., None], axis=-1)[..., 0]
    return np.where(k == 0, np.inf, out).astype(np.float32)


def _skip_if_no_native(impl):
    if impl == "native" and not native.available():
        pytest.skip("native kernels unavailable (no C++ compiler)")


@IMPLS
@pytest.mark.parametrize("dist", sorted(DISTS))
@pytest.mark.parametrize("n", [7, 3000])
def test_threshold_equals_np_sort(impl, dist, n):
    _skip_if_no_native(impl)
    rng = np.random.default_rng(n)
    x = DISTS[dist](rng, (5, n)).astype(np.float32)
    f = jax.jit(lambda x, k: T.magnitude_threshold(x, k, impl=impl))
    for k in sorted({0, 1, n // 5, n // 2, n - 1, n, n + 3}):
        got = np.asarray(f(x, np.full(5, k, np.int32)))
        np.testing.assert_array_equal(got, _expected(x, k), err_msg=f"{dist} n={n} k={k}")


@IMPLS
@pytest.mark.parametrize("n", [1, 2, 300])
def test_short_rows(impl, n):
    _skip_if_no_native(impl)
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    f = jax.jit(lambda x, k: T.magnitude_threshold(x, k, impl=impl))
    for k in (range(0, n + 2) if n <= 3 else (0, 1, 150, 299, 300, 301)):
        got = np.asarray(f(x, np.full(3, k, np.int32)))
        np.testing.assert_array_equal(got, _expected(x, k), err_msg=f"n={n} k={k}")


@IMPLS
def test_cut_selects_exactly_the_top_k(impl):
    """|x| >= cut keeps exactly the top-k entries (continuous data: no ties), for per-row k."""
    _skip_if_no_native(impl)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 2500)).astype(np.float32)
    k = np.array([0, 1, 17, 500, 2499, 2500], np.int32)
    cut = np.asarray(jax.jit(lambda x, k: T.magnitude_cut(x, k, impl=impl))(x, k))
    np.testing.assert_array_equal((np.abs(x) >= cut[:, None]).sum(axis=1), k)
    np.testing.assert_array_equal(np.abs(x) >= cut[:, None], np.abs(x) >= _expected(x, k)[:, None])


def test_leading_dims_and_bf16_input():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 400)).astype(np.float32)
    got = np.asarray(T.magnitude_threshold(jnp.asarray(x), 40, impl="jnp"))
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, _expected(x, 40))
    xb = jnp.asarray(x, jnp.bfloat16)
    got_b = np.asarray(T.magnitude_threshold(xb, 40, impl="jnp"))
    np.testing.assert_array_equal(got_b, _expected(np.asarray(xb.astype(jnp.float32)), 40))


def test_jnp_select_without_jit_equals_with_jit():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2100)).astype(np.float32)  # long enough for the sampling stage
    with jax.disable_jit():
        eager = np.asarray(T.magnitude_threshold(x, 420, impl="jnp"))
    np.testing.assert_array_equal(eager, np.asarray(jax.jit(lambda x: T.magnitude_threshold(x, 420, impl="jnp"))(x)))
    np.testing.assert_array_equal(eager, _expected(x, 420))


def test_reference_is_sort_based_and_exact():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 99)).astype(np.float32)
    for k in (0, 1, 50, 99):
        np.testing.assert_array_equal(np.asarray(T.magnitude_threshold_reference(x, k)), _expected(x, k))


def test_jnp_select_uses_no_sort_and_no_top_k():
    jaxpr = str(jax.make_jaxpr(lambda x: T.magnitude_threshold(x, 100, impl="jnp"))(jnp.zeros((4, 3000))))
    assert "top_k" not in jaxpr and "sort" not in jaxpr
    assert "while" in jaxpr  # the counting loop


def test_jnp_select_needs_few_passes_on_gaussian_rows():
    """Interpolated pivots: 64 Gaussian rows of a LoRA-sized tensor finish in far fewer passes than bisection (31)."""
    rng = np.random.default_rng(5)
    for n in (3072, 9216):
        x = rng.standard_normal((64, n)).astype(np.float32)
        passes = int(jax.jit(lambda x: T.select_passes(x, int(0.2 * n)))(x))
        assert passes <= 16, (n, passes)


def test_native_builds_where_a_compiler_exists():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    assert native.available()
    assert native.library_path().is_file()
    assert T.resolve_impl("auto") == "native"


def test_keep_count_matches_peft():
    # PEFT and mergekit keep int(density * numel) entries
    assert T.keep_count(9216, 0.2) == int(0.2 * 9216) == 1843
    assert T.keep_count(10, 0.05) == 0
