"""Kill -9 the synthetic run at seeded points (mid-save, between ask and tell, after a save, at a random moment),
resume each time, and require the final state and best individual to be bit-identical to an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

GENERATIONS = 9
PARAMS = dict(population_size=6, max_population_size=8, n_offspring=3, cross="linear", combine="linear",
              selection="tournament", sigma=0.02, individual_mutation_rate=0.8, gene_mutation_rate=0.5,
              elite_percent=0.2)

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import jax, numpy as np
    from genome_jax import checkpoint, synthetic
    from genome_jax.strategies import get_strategy, make_strategy

    out, method, kill = sys.argv[1], sys.argv[2], sys.argv[3]
    phase, at = (kill.split(":")[0], int(kill.split(":")[1])) if ":" in kill else (kill, -1)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    if phase in ("save", "saved"):
        original_save = checkpoint.RunCheckpointer.save
        def save(self, step, state, extra=None):
            original_save(self, step, state, extra)
            if step == at:
                if phase == "saved":
                    self.wait()  # step fully on disk
                die()  # "save": orbax is still writing <step>.orbax-checkpoint-tmp in the background
        checkpoint.RunCheckpointer.save = save
    if phase == "ask":  # between ask and tell
        cls = get_strategy(method)
        original_ask = cls.ask
        def ask(self, key, state, params):
            out_ = original_ask(self, key, state, params)
            if int(state.generation) == at:
                die()
            return out_
        cls.ask = ask

    def on_generation(g, state, metrics):
        print("GEN", g, flush=True)

    experts = synthetic.synthetic_experts(2, n_experts=3, n_layers=2, d_model=16, rank=4)
    strategy, params = make_strategy(method, **json.loads({params!r}))
    r = synthetic.run_synthetic(out, strategy, params, seed=11, generations={generations}, experts=experts,
                                on_generation=on_generation)
    leaves = jax.tree_util.tree_flatten_with_path(r.state)[0]
    arrays = {{"state" + jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}}
    arrays.update({{"best" + jax.tree_util.keystr(p): np.asarray(x)
                   for p, x in jax.tree_util.tree_flatten_with_path(r.best)[0]}})
    np.savez(os.path.join(out, "final.npz"), **arrays)
    print("DONE", r.generations, r.resumed_from, flush=True)
    """
)


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("sigkill")
    script = d / "child.py"
    script.write_text(CHILD.format(params=json.dumps(PARAMS), generations=GENERATIONS))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           # share compiled programs between the many child processes (same programs, same bits)
           "JAX_COMPILATION_CACHE_DIR": str(d / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    repo = Path(__file__).resolve().parents[2]

    def start(out: Path, method: str, kill: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(out), method, kill], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return start


def _finish(proc: subprocess.Popen, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _load(out: Path) -> dict:
    with np.load(out / "final.npz") as z:
        return {k: z[k] for k in z.files}


def _kill_at_random_moment(proc: subprocess.Popen, rng: np.random.Generator) -> bool:
    """SIGKILL from outside, a seeded delay after the child reports its first generation. True if it was killed."""
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("GEN"):
            time.sleep(float(rng.uniform(0.0, 0.4)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            break
    rc, _, err = _finish(proc)
    return rc == -signal.SIGKILL


CHAINS = {
    # genome_plus carries the most state (velocities, personal bests, global best/worst, growing population).
    # "random" comes last: a seeded delay of up to 0.4 s can let a fast child run past any later kill point, which
    # then never fires (CI, stop 20: "save:8" exited 0 after the random kill landed past step 8).
    "genome_plus": ["save:2", "ask:3", "saved:5", "save:7", "random"],
    "genome": ["ask:1", "save:4", "random"],
}


@pytest.mark.parametrize("method", ["genome", "genome_plus"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, child, method):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    rc, out, err = _finish(child(ref_dir, method, "none"))
    assert rc == 0, err[-3000:]
    ref = _load(ref_dir)

    rng = np.random.default_rng(0)
    ckpts = run_dir / "checkpoints"
    killed = 0
    for kill in CHAINS[method]:
        proc = child(run_dir, method, kill)
        if kill == "random":
            killed += _kill_at_random_moment(proc, rng)
            continue
        rc, out, err = _finish(proc)
        assert rc == -signal.SIGKILL, (kill, rc, err[-3000:])
        killed += 1
        if kill.startswith("save:"):
            # the kill really interrupted a checkpoint write
            assert any(".orbax-checkpoint-tmp" in p for p in os.listdir(ckpts)), os.listdir(ckpts)
    assert killed >= len(CHAINS[method]) - 1

    rc, out, err = _finish(child(run_dir, method, "none"))
    assert rc == 0, err[-3000:]
    assert "DONE %d" % GENERATIONS in out
    got = _load(run_dir)
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].tobytes() == ref[k].tobytes(), k
    assert not [p for p in os.listdir(ckpts) if "tmp" in p]
