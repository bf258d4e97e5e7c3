"""Native CPU kernels (C++ through the XLA FFI), built on first use with the system C++ compiler.

`kth_largest_abs(x2d, k)` is the exact k-th largest |x| per row by radix select (kernels/native/radix_select.cc):
one custom call per tensor, two reads of each row while it sits in L1/L2, no sort. XLA:CPU has no fast way to do
this (a counting pass per pivot, `top_k` ~250 ns/element, `sort` ~100 ns/element), and a jnp while loop per tensor
costs minutes of compile time for a 420-tensor population.

The shared library is compiled once per (source, compiler flags, jaxlib headers, CPU) into
$GENOME_KERNELS_CACHE (default ~/.cache/genome-jax/kernels/) via a temp file + rename, so concurrent processes
never load half a file. Without a compiler, or with GENOME_NATIVE_KERNELS=0, `available()` is False and callers
use the pure-jnp path (exact too, slower). Inputs must be finite (NaN ranks above +inf here).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

__all__ = ["available", "kth_largest_abs", "library_path"]

_SRC = Path(__file__).with_name("native") / "radix_select.cc"
_TARGET = "genome_kth_largest_abs"
_FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w"]
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path() -> Path:
    """Where the compiled library for this source + CPU lives (it may not exist yet)."""
    h = hashlib.sha256()
    for part in (_SRC.read_bytes(), " ".join(_FLAGS).encode(), jax.ffi.include_dir().encode(),
                 jax.__version__.encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    root = Path(os.environ.get("GENOME_KERNELS_CACHE", Path.home() / ".cache" / "genome-jax" / "kernels"))
    return root / f"libgenome_kernels-{h.hexdigest()[:16]}.so"


def _build(out: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SRC), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def available() -> bool:
    """True when the native kernels are built and registered with XLA (builds them on the first call)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok = False
        if os.environ.get("GENOME_NATIVE_KERNELS", "1") != "0":
            try:
                lib_path = library_path()
                if not lib_path.exists():
                    _build(lib_path)
                lib = ctypes.cdll.LoadLibrary(str(lib_path))
                jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.GenomeKthLargestAbs), platform="cpu")
                _state["lib"] = lib  # keep the handle alive
                ok = True
            except Exception as e:  # no compiler, read-only cache, ...: the jnp path still works
                _log.warning("native kernels unavailable, using the pure-jnp select: %s", e)
        _state["ok"] = ok
        return ok


def kth_largest_abs(x2d, k) -> jax.Array:
    """Exact k-th largest |x| per row: x2d (R, n) float32, k (R,) int32 -> (R,) float32 (k <= 0 -> +inf).

    CPU only; call `available()` first. Jittable; not differentiable."""
    x2d = jnp.asarray(x2d, jnp.float32)
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), x2d.shape[:1])
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(x2d.shape[:1], jnp.float32), vmap_method="sequential")
    return call(x2d, k)
