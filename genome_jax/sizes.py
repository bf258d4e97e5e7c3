"""Population-size arithmetic shared by the settings checks (no JAX: `genome run` checks its flags and the run folder's
lock before importing JAX) and the strategies."""
from __future__ import annotations

import math


def n_elites(population_size: int, elite_percent: float) -> int:
    """Number of elites: ceil(elite_percent * population_size), so at least one when elite_percent > 0 (a static
    Python int; the one rule the strategies use for their elites and survivors)."""
    return int(math.ceil(elite_percent * population_size - 1e-9))
