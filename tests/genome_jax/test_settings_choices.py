"""genome_jax.settings spells the library's choice lists itself (so `genome run` checks flags and the folder lock
without importing JAX): they must equal the lists the operators and strategies accept, and importing the table must
not import JAX."""
from __future__ import annotations

import subprocess
import sys

from genome_jax import settings
from genome_jax.operators import registry, selection
from genome_jax.strategies import STRATEGIES, common


def test_choice_lists_equal_the_library_ones():
    assert settings.METHODS == tuple(STRATEGIES)
    assert settings.MERGE_METHODS == registry.METHODS
    assert settings.DEFAULT_DENSITY == registry.MergeConfig.density
    assert settings.PARENT_METHODS == selection.PARENT_METHODS
    assert settings.SURVIVOR_METHODS == selection.SURVIVOR_METHODS
    assert settings.CROSS_WEIGHTS == common.CROSS_WEIGHTS
    assert settings.MUTATIONS == common.MUTATIONS


def test_the_table_the_run_config_and_genome_run_flags_load_without_jax():
    code = ("import sys, genome_jax.settings, genome_jax.run_config, genome_jax.run_lock, scripts.run_cmd; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'torch', 'vllm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
