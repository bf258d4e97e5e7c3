"""Strategy tests: until genome_jax.operators.merge exists, a linear stand-in (tests only) is installed."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _merge_stub import ensure_merge  # noqa: E402

ensure_merge()
