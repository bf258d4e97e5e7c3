"""Helpers of the reliability suites: run the real `genome` CLI in a subprocess, read a run folder back, compare two
runs, list what a killed run may have left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FAULT_ENV = ("GENOME_FAULT_POINT", "GENOME_FAULT_TRACE")

# The synthetic TEST PROBLEM at a small size: 4 random experts (2 layers, d=32, rank 4), 4 generations of 5.
SYNTHETIC = ["run", "--tasks", "synthetic", "--population_size", "5", "--individual_mutation_rate", "0.8",
             "--gene_mutation_rate", "0.3", "--sigma", "0.05", "--elite_percent", "0.2", "--seed", "7",
             "--max_iter", "4", "--quiet"]
SYNTHETIC_PLUS = [*SYNTHETIC, "--method", "genome_plus", "--population_size", "4", "--max_population_size", "6"]


def genome(args: Sequence[str], *, env: dict | None = None, timeout: float = 300,
           max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`python -m scripts.cli ARGS` from the repo root, fault variables cleared unless given in `env`.
    max_file_bytes: RLIMIT_FSIZE of the child (a write past it fails with EFBIG; Python ignores SIGXFSZ)."""
    full = {k: v for k, v in os.environ.items() if k not in FAULT_ENV}
    full.update(PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable, "-m", "scripts.cli", *map(str, args)]
    if max_file_bytes is not None:  # set by prlimit, not preexec_fn: no fork of a threaded (JAX) test process
        cmd = ["prlimit", f"--fsize={max_file_bytes}", "--", *cmd]
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def describe(p: subprocess.CompletedProcess) -> str:
    return f"rc={p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------ run folders
def final_state(out: Path):
    """The newest intact checkpointed strategy state of a run folder (genome_jax.checkpoint.Restored)."""
    from scripts.run_loop import saved_state

    return saved_state(out)


def state_leaves(state) -> list[tuple[str, np.ndarray]]:
    import jax

    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fitness_columns(out: Path) -> list[tuple]:
    return [(r["generation"], r["best"], r["mean"], r["worst"], r["best_ever"]) for r in metrics(out)]


def orphans(out: Path) -> list[str]:
    """Everything under `out` that looks like a temp file or folder of ours or of orbax (relative paths)."""
    bad = []
    for p in sorted(out.rglob("*")):
        n = p.name
        if ".tmp" in n or ".old-" in n or "orbax-checkpoint-tmp" in n or n.startswith(".tmp-"):
            bad.append(str(p.relative_to(out)))
    ck = out / "checkpoints"
    if ck.is_dir():
        bad += [f"checkpoints/{p.name}" for p in ck.iterdir()
                if not (p.name.isdigit() and p.is_dir()) and p.name != "run_config.json"]
    return bad


def assert_visible_files_whole(out: Path) -> None:
    """What a reader can see in a (possibly killed) run folder is never torn: every report parses, the best
    adapter folder (if there) has both of its files and they load."""
    for name in ("run_config.json", "experts.json", "result.json", "checkpoints/run_config.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())
    best = out / "best_adapter"
    if best.exists():
        from safetensors.numpy import load_file

        json.loads((best / "adapter_config.json").read_text())
        assert load_file(str(best / "adapter_model.safetensors"))
    png = out / "fitness.png"
    if png.exists():
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", "fitness.png is torn"
    if (out / "metrics.jsonl").exists():
        lines = (out / "metrics.jsonl").read_text().splitlines()
        for line in lines[:-1]:  # a torn last line is allowed (a kill inside write()); it is cut on resume
            json.loads(line)


def assert_same_outcome(ref: Path, out: Path) -> None:
    """`out` ended exactly like the uninterrupted `ref`: final state bit for bit, best adapter bytes, reports."""
    a, b = final_state(ref), final_state(out)
    assert a is not None and b is not None
    assert a.step == b.step, (a.step, b.step)
    la, lb = state_leaves(a.state), state_leaves(b.state)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x, y, equal_nan=True), f"state leaf {k} differs"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "best_adapter" / name).read_bytes() == (ref / "best_adapter" / name).read_bytes(), name
    assert json.loads((out / "experts.json").read_text()) == json.loads((ref / "experts.json").read_text())
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert ra["best"]["dev_fitness"] == rb["best"]["dev_fitness"]
    assert ra["generations"] == rb["generations"]
    assert fitness_columns(out) == fitness_columns(ref)  # one record per generation, none lost or doubled
    assert (out / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fill(fs: Path, leave: int) -> Path:
    """Fill the file system at `fs` with a ballast file so that about `leave` bytes stay free."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    ballast = fs / "ballast"
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, free - leave))
    return ballast


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def real_shaped_experts(where: Path, model_path: Path, n: int = 2, rank: int = 4, scale: float = 0.01,
                        layers=(0, 1)) -> Path:
    """n PEFT folders on the real model's q_proj (layers 0-1), random and seeded: valid adapters for it, written
    without loading the model (only its config.json)."""
    from safetensors.numpy import save_file

    hidden = json.loads((Path(model_path) / "config.json").read_text())["hidden_size"]
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        t = {}
        for layer in layers:
            key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            t[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, hidden)) / hidden ** .5).astype(np.float32)
            t[f"{key}.lora_B.weight"] = (rng.standard_normal((hidden, rank)) * scale).astype(np.float32)
        folder = where / f"expert{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_path), "r": rank,
            "lora_alpha": 2 * rank, "target_modules": ["q_proj"], "bias": "none", "use_rslora": False}))
        save_file(t, str(folder / "adapter_model.safetensors"))
    return where
