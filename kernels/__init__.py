"""Array kernels with no knowledge of LoRA or GENOME (imports nothing from genome_jax).

- `threshold`: exact k-th largest magnitude per row (`magnitude_threshold`, `magnitude_cut`): a native C++ radix
  select through the XLA FFI on CPU (`native`), a pure-jnp counting select elsewhere, and a sort-based reference.
- `ties`: the TIES merge of gathered parents (trim by per-parent cut, elect sign, disjoint mean) as a Pallas kernel
  (`ties_merge_pallas`; interpret mode on CPU) and its pure-jnp reference / fallback (`ties_merge_reference`).
"""
from kernels.threshold import (  # noqa: F401
    keep_count,
    magnitude_cut,
    magnitude_threshold,
    magnitude_threshold_reference,
)
from kernels.ties import ties_combine, ties_merge, ties_merge_pallas, ties_merge_reference  # noqa: F401
