"""The merge-method registry: names, what each method needs, their defaults and constants, and `MergeConfig`.

The bottom of `operators/`: `methods` (single-child merges), `delta_space` and `merge` import it; it imports only
`trim` (which methods cut by magnitude) and `kernels.ties` (sign and normalise rules).

    METHODS[name] -> MethodSpec(parents=K or None, density=uses MergeConfig.density, lowrank=exact in delta space)
"""
from __future__ import annotations

import dataclasses
import math

from genome_jax.errors import UserError
from genome_jax.operators import trim as trim_ops
from kernels import ties as kties

__all__ = ["DENSITY_METHODS", "KERNELS", "LOWRANK_METHODS", "METHODS", "METHOD_SPECS", "MergeConfig", "MethodSpec",
           "SELECTS", "SLERP_DOT_THRESHOLD", "SLERP_EPS", "SPACES", "SVDS"]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a merge method needs. parents: the exact number of parents (None: any K >= 1). density: it reads
    MergeConfig.density. lowrank: in delta space its child is a linear combination of the parents' B A, merged
    exactly from r x r products (the others form each parent's dW and re-factor by truncated SVD)."""

    parents: int | None = None
    density: bool = False
    lowrank: bool = False


METHOD_SPECS: dict[str, MethodSpec] = {
    "linear": MethodSpec(lowrank=True),
    "task_arithmetic": MethodSpec(lowrank=True),
    "ties": MethodSpec(density=True),
    "dare_linear": MethodSpec(density=True),
    "dare_ties": MethodSpec(density=True),
    "breadcrumbs": MethodSpec(density=True),
    "slerp": MethodSpec(parents=2, lowrank=True),
    "blx_alpha": MethodSpec(),
    "uniform": MethodSpec(),
    "magnitude_prune": MethodSpec(density=True),
}
METHODS = tuple(METHOD_SPECS)
DENSITY_METHODS = tuple(m for m, s in METHOD_SPECS.items() if s.density)
LOWRANK_METHODS = tuple(m for m, s in METHOD_SPECS.items() if s.lowrank)
SPACES = ("factors", "delta")
SVDS = ("randomized", "exact")
KERNELS = ("auto", "jnp", "pallas", "pallas_interpret")
SELECTS = ("auto", "native", "jnp")

# slerp (mergekit's constants): plain lerp when |cos| exceeds the threshold; a copy is normalised only when its
# norm exceeds the epsilon
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Static configuration of a merge (hashable: a static argument of the jitted crossover).

    method: one of METHODS. density: fraction kept by trimming / DARE. majority_sign_method: "total" | "frequency".
    normalize: "weight" | "none" (mergekit normalize true/false) | "count" (PEFT; shrinks a self-merge, see
    operators.merge). rescale: DARE divides kept entries by density. gamma: breadcrumbs' fraction of largest
    magnitudes dropped. t: slerp position (None: from the weights). alpha: BLX-alpha extension. scale:
    task_arithmetic's lambda. space: "factors" | "delta".
    Delta space, elementwise methods: svd "randomized" | "exact", oversample and power_iters of the randomized SVD,
    child_chunk children per block (memory). kernel: TIES implementation in factor space ("auto": Pallas on GPU,
    fused jnp elsewhere; "jnp", "pallas", "pallas_interpret"). select: threshold select ("auto" | "native" | "jnp").
    """

    method: str = "ties"
    density: float = 0.2
    majority_sign_method: str = "total"
    normalize: str = "weight"
    rescale: bool = True
    gamma: float = 0.01
    t: float | None = None
    alpha: float = 0.5
    scale: float = 1.0
    space: str = "factors"
    svd: str = "randomized"
    oversample: int = 8
    power_iters: int = 2
    child_chunk: int = 8
    kernel: str = "auto"
    select: str = "auto"

    def __post_init__(self):
        for field, allowed in (("method", METHODS), ("space", SPACES), ("majority_sign_method", kties.SIGN_METHODS),
                               ("normalize", kties.NORMALIZE), ("svd", SVDS), ("kernel", KERNELS),
                               ("select", SELECTS)):
            if getattr(self, field) not in allowed:
                raise UserError(f"merge {field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise UserError(f"merge density must be in (0, 1], got {self.density!r}")
        if not (isinstance(self.gamma, (int, float)) and 0.0 <= self.gamma < 1.0):
            raise UserError(f"merge gamma must be in [0, 1), got {self.gamma!r}")
        if self.t is not None and not (isinstance(self.t, (int, float)) and 0.0 <= self.t <= 1.0):
            raise UserError(f"merge t (slerp) must be in [0, 1] or None, got {self.t!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0.0 and math.isfinite(self.alpha)):
            raise UserError(f"merge alpha (blx_alpha) must be >= 0, got {self.alpha!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise UserError(f"merge scale must be a finite number, got {self.scale!r}")
        for name in ("oversample", "power_iters", "child_chunk"):
            v, low = getattr(self, name), 1 if name == "child_chunk" else 0
            if not (isinstance(v, int) and v >= low):
                raise UserError(f"merge {name} must be an integer >= {low}, got {v!r}")

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def cut_method(self) -> str | None:
        """The trimming rule whose per-parent cuts this merge needs (None: no magnitude trimming)."""
        return self.method if self.method in trim_ops.CUT_METHODS else None
