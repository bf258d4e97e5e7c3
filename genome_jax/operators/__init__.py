"""Evolution operators: pure functions over the stacked population (leading axis = individual).

Submodules: `registry` (merge-method names, MergeConfig, constants; the bottom), `methods` (single-child
merges), `delta_space`, `merge` (crossover over a generation), `mutation`, `selection`, `succession`, `trim`.
Import from the submodules; the names below are re-exported for convenience.
"""
from genome_jax.operators.mutation import gaussian_mutation, svd_mutation  # noqa: F401
from genome_jax.operators.selection import elites, roulette, select_parents, survivors, tournament  # noqa: F401
from genome_jax.operators.succession import SuccessionConfig, succession, update_personal_best  # noqa: F401
from genome_jax.operators.merge import METHODS, MergeConfig, crossover, merge_one, parent_cuts  # noqa: F401
