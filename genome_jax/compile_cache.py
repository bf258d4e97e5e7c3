"""The persistent XLA compilation cache: a program compiled once (ask, tell, the scorer) is loaded, not recompiled,
by every later process with the same shapes.

Where: $GENOME_JAX_COMPILE_CACHE (a folder; "0" turns the cache off), else a user's own JAX_COMPILATION_CACHE_DIR
(left to JAX), else `<cache root>/jax-compile-cache` (~/.cache/genome-jax/, see model_store.cache_root).
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

from genome_jax.model_store import cache_root

ENV = "GENOME_JAX_COMPILE_CACHE"


def compile_cache_dir() -> Path | None:
    """The folder this process would use (None: off, or JAX's own JAX_COMPILATION_CACHE_DIR governs)."""
    env = os.environ.get(ENV)
    if env == "0":
        return None
    if env:
        return Path(env).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    return cache_root() / "jax-compile-cache"


def enable_compilation_cache(min_compile_time_s: float = 0.1) -> Path | None:
    """Point JAX's persistent cache at `compile_cache_dir()`; returns the folder (None: not enabled here).
    Programs that compile faster than `min_compile_time_s` are not worth a file (a generation's per-module programs
    take 0.2-2 s each on a 2-core CPU, so the threshold sits below them). A read-only home: no cache."""
    path = compile_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return path
