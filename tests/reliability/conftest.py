"""Fixtures of the reliability suites (fault injection, bad inputs): uninterrupted reference runs of the synthetic
TEST PROBLEM, and small file systems that fill up."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from rel_helpers import SYNTHETIC, SYNTHETIC_PLUS, describe, genome


@pytest.fixture(scope="session")
def synthetic_reference(tmp_path_factory):
    """method -> (run folder, fault points passed in order) of an uninterrupted synthetic run."""
    root = tmp_path_factory.mktemp("reference")
    made: dict[str, tuple[Path, list[str]]] = {}

    def get(method: str = "genome") -> tuple[Path, list[str]]:
        if method not in made:
            out, trace = root / method, root / f"trace-{method}.txt"
            args = {"genome": SYNTHETIC, "genome_plus": SYNTHETIC_PLUS}[method]
            p = genome([*args, "--output_dir", out], env={"GENOME_FAULT_TRACE": str(trace)})
            assert p.returncode == 0, describe(p)
            made[method] = (out, trace.read_text().split())
        return made[method]

    return get


@pytest.fixture
def small_tmpfs(tmp_path):
    """small_tmpfs(size_bytes) -> a mounted tmpfs of that size (unmounted afterwards); skips where mounting is
    not allowed (not root, no CAP_SYS_ADMIN). The RLIMIT_FSIZE variants of the tests run everywhere."""
    mounted: list[Path] = []

    def make(size: int) -> Path:
        where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)

