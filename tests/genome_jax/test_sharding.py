"""The population sharded over devices: same results as one device, bit for bit, and checkpoints that move between
device counts.

Multi-device runs need XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts, and pytest runs
every test module in one process (JAX already started), so each scenario runs this file as a child script with
its own device count and writes its results to an .npz; the test compares them. A child with 0 devices runs
the plain (unsharded) strategy module on the default device.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
GENERATIONS = 4
POP_A = ".population['model.layers.0.self_attn.q_proj']['A']"  # a population leaf's path in the state
RESUME_AT = 2


def _strategy(method: str):
    from genome_jax.strategies import make_strategy

    if method == "genome":  # P = 8: divisible by 1, 2, 4 and 8 devices
        return make_strategy("genome", population_size=8, elite_percent=0.25, individual_mutation_rate=0.5,
                             gene_mutation_rate=0.2, sigma=0.05)
    return make_strategy("genome_plus", population_size=8, max_population_size=16, n_offspring=8, elite_percent=0.25,
                         individual_mutation_rate=0.5, gene_mutation_rate=0.2, sigma=0.05)


# ---- the child side ---------------------------------------------------------------------------------------------

def _flat(tree) -> dict[str, np.ndarray]:
    import jax

    from genome_jax.sharding import to_host

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(to_host(tree))[0]}


def _layout(tree) -> dict[str, list]:
    """{leaf path: [number of devices holding it, partition spec]}: where each leaf lives."""
    import jax

    def spec(x):
        return [str(a) for a in getattr(x.sharding, "spec", ())]

    return {jax.tree_util.keystr(p): [len(x.sharding.device_set), spec(x)]
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def child_run(a: dict) -> None:
    """run_synthetic for `generations` on `devices` devices (0: unsharded), resuming what `out_dir` holds."""
    import jax

    from genome_jax import checkpoint, sharding
    from genome_jax.synthetic import run_synthetic, synthetic_experts

    assert jax.device_count() == max(a["devices"], 1), jax.devices()
    strategy, params = _strategy(a["method"])
    mesh = sharding.population_mesh() if a["devices"] else None
    report: dict = {}
    if mesh is not None and a.get("check_restore"):
        # restore the newest checkpoint (written on another device count) straight into this mesh's layout, with
        # an abstract target (ShapeDtypeStructs carrying the shardings the state declares)
        strat = sharding.ShardedStrategy(strategy, mesh)
        shapes = jax.eval_shape(lambda: strategy.initial_population(jax.random.PRNGKey(0), synthetic_experts(0)))
        r = checkpoint.restore_latest(Path(a["out_dir"]) / "checkpoints", strat.state_template(shapes, params))
        report["restored_step"] = r.step
        report["restored_layout"] = _layout(r.state)
        np.savez(a["restored"], **_flat(r.state))
    run = run_synthetic(a["out_dir"], strategy, params, seed=0, generations=a["generations"], mesh=mesh,
                        async_save=False)
    report.update(resumed_from=run.resumed_from, generations=run.generations, layout=_layout(run.state),
                  first_best=run.history[0]["best"] if run.history and run.resumed_from is None else None,
                  best_ever=run.best_fitness)
    np.savez(a["result"], **_flat(run.state))
    Path(a["report"]).write_text(json.dumps(report))


def child_operators(a: dict) -> None:
    """Plain ask/score/tell loop (no checkpoint) through ShardedStrategy; in a multi-process job when asked."""
    import jax

    if a.get("processes", 1) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from genome_jax.sharding import initialize_distributed

        assert initialize_distributed(a["coordinator"], a["processes"], a["process_id"])
    import jax.numpy as jnp

    from genome_jax import sharding
    from genome_jax.evolve import generation_keys, initial_keys
    from genome_jax.synthetic import make_problem, score, synthetic_experts

    strategy, params = _strategy(a["method"])
    whole = lambda tree: tree  # noqa: E731
    if a["devices"]:
        mesh = sharding.population_mesh()
        strategy = sharding.ShardedStrategy(strategy, mesh)
        whole = lambda tree: sharding.replicate(tree, mesh)  # noqa: E731  (the scorer sees whole individuals)
    experts = synthetic_experts(0)
    problem = make_problem(experts, seed=1)
    k_pop, k_run = initial_keys(jax.random.PRNGKey(0))
    pop = strategy.initial_population(k_pop, experts)
    state = strategy.init(k_run, pop, score(problem, pop), params)
    for g in range(GENERATIONS):
        k_ask, k_tell = generation_keys(k_run, g)
        children, state = strategy.ask(k_ask, state, params)
        fitness = jnp.where(strategy.needs_score(state), score(problem, whole(children)), jnp.nan)
        state, _ = strategy.tell(k_tell, state, children, fitness, params)
    report = {"devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "processes": jax.process_count(), "layout": _layout(state)}
    flat = _flat(state)  # every process gathers the whole state (a collective: all processes take part)
    if jax.process_index() == 0:
        np.savez(a["result"], **flat)
        Path(a["report"]).write_text(json.dumps(report))


def child_errors(a: dict) -> None:
    from genome_jax import sharding
    from genome_jax.errors import UserError
    from genome_jax.strategies import Genome

    out = {}
    try:
        sharding.ShardedStrategy(Genome(population_size=10), sharding.population_mesh())
    except UserError as e:
        out["indivisible"] = str(e)
    try:
        sharding.population_mesh(n_devices=9)
    except UserError as e:
        out["too_many"] = str(e)
    out["mesh4"] = sharding.population_mesh(n_devices=4).devices.size
    Path(a["report"]).write_text(json.dumps(out))


# ---- the test side ----------------------------------------------------------------------------------------------

# XLA fuses ops differently once a program is partitioned, and where LLVM contracts a*b+c into one fused multiply-add
# (rounded once) in one program and not in the other, the last bit differs. Without FMA instructions the same
# arithmetic gives the same bits, so the bit-for-bit checks run with FMA off (x86: max ISA AVX, which predates FMA3);
# test_with_fma_only_rounding_differs bounds what FMA changes.
NO_FMA = "--xla_cpu_max_isa=AVX" if platform.machine() in ("x86_64", "AMD64") else ""


def _child(kind: str, devices: int, fma: bool = False, **kw) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(devices, 1)} {'' if fma else NO_FMA}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    args = json.dumps(dict(kw, devices=devices))
    return subprocess.Popen([sys.executable, str(HERE), kind, args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(*procs: subprocess.Popen, timeout: float = 600) -> None:
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"child failed ({p.returncode}):\n{out[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _load(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_identical(a: dict, b: dict) -> None:
    """Every leaf of the state bit for bit."""
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k], equal_nan=True)]
    assert not differ, f"leaves differ: {differ}"


METHODS = ("genome", "genome_plus")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario, batched into one child process per device count (children run two at a time):

    1 device, unsharded: the reference run of GENERATIONS generations per method (and the plain ask/tell loop).
    8 devices: the same runs sharded; the first RESUME_AT generations checkpointed; the error messages.
    2 and 1 devices: resume the 8-device checkpoints (restored straight into the new layout) to GENERATIONS.
    """
    root = tmp_path_factory.mktemp("sharding")
    f = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    ref = [dict(kind="run", method=m, out_dir=f("ref", m), generations=GENERATIONS, result=f("ref", m + ".npz"),
                report=f("ref", m + ".json")) for m in METHODS]
    ref.append(dict(kind="operators", method="genome", result=f("ref", "loop.npz"), report=f("ref", "loop.json")))
    eight = [dict(kind="run", method=m, out_dir=f("d8", m), generations=GENERATIONS, result=f("d8", m + ".npz"),
                  report=f("d8", m + ".json")) for m in METHODS]
    eight += [dict(kind="run", method=m, out_dir=f("first", m), generations=RESUME_AT, result=f("first", m + ".npz"),
                   report=f("first", m + ".json")) for m in METHODS]
    eight.append(dict(kind="errors", report=f("errors.json")))
    _wait(_child("batch", 0, jobs=ref), _child("batch", 8, jobs=eight))

    resume = {}
    for n in (2, 1):
        jobs = []
        for m in METHODS:
            shutil.copytree(root / "first" / m, root / f"resume{n}" / m)
            jobs.append(dict(kind="run", method=m, out_dir=f(f"resume{n}", m), generations=GENERATIONS,
                             result=f(f"resume{n}", m + ".npz"), report=f(f"resume{n}", m + ".json"),
                             restored=f(f"resume{n}", m + "-restored.npz"), check_restore=True))
        resume[n] = jobs
    _wait(_child("batch", 2, jobs=resume[2]), _child("batch", 1, jobs=resume[1]))
    return root


def _result(root, *parts) -> tuple[dict, dict]:
    path = root.joinpath(*parts)
    return _load(str(path) + ".npz"), json.loads(Path(str(path) + ".json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_sharded_run_is_identical_to_unsharded(runs, method):
    sharded, report = _result(runs, "d8", method)
    reference, _ = _result(runs, "ref", method)
    assert report["generations"] == GENERATIONS and report["resumed_from"] is None
    # the population really is split over the 8 devices; per-run scalars are replicated
    assert report["layout"][POP_A] == [8, ["pop"]]
    assert report["layout"][".fitness"] == [8, []]  # P numbers: whole on every device
    assert report["layout"][".generation"] == [8, []]
    _assert_identical(sharded, reference)
    # and the run went somewhere: the best improved over the generations
    assert report["best_ever"] > report["first_best"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("devices", [2, 1])
def test_checkpoint_saved_on_8_devices_resumes_on_fewer(runs, method, devices):
    saved, first = _result(runs, "first", method)
    assert first["layout"][POP_A] == [8, ["pop"]] and first["generations"] == RESUME_AT
    resumed, report = _result(runs, f"resume{devices}", method)
    assert report["restored_step"] == RESUME_AT and report["resumed_from"] == RESUME_AT
    # restored straight into the new layout (an abstract target carrying the shardings): split over the new count
    assert report["restored_layout"][POP_A] == [devices, ["pop"]]
    assert report["layout"][POP_A] == [devices, ["pop"]]
    _assert_identical(_load(str(runs / f"resume{devices}" / method) + "-restored.npz"), saved)
    # and the continued run ends exactly where the uninterrupted single-device run ended
    _assert_identical(resumed, _result(runs, "ref", method)[0])


def test_with_fma_only_rounding_differs(tmp_path):
    """FMA on (the machine's default): the sharded loop makes the same discrete choices (parents, elites, sources)
    and its weights and fitness agree with the single-device loop to float32 rounding."""
    one, eight = tmp_path / "one", tmp_path / "eight"
    _wait(_child("operators", 0, fma=True, method="genome", result=str(one) + ".npz", report=str(one) + ".json"),
          _child("operators", 8, fma=True, method="genome", result=str(eight) + ".npz", report=str(eight) + ".json"))
    a, b = _load(str(one) + ".npz"), _load(str(eight) + ".npz")
    assert a.keys() == b.keys()
    for k in a:
        if np.issubdtype(a[k].dtype, np.floating):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            assert np.array_equal(a[k], b[k]), k


def test_population_must_split_evenly(runs):
    out = json.loads((runs / "errors.json").read_text())
    assert out["indivisible"] == ("population size 10 does not split over 8 devices; use a multiple of 8 "
                                  "(or fewer devices, e.g. 2)")
    assert out["too_many"] == "n_devices 9: this job has 8 device(s)"
    assert out["mesh4"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_device(runs, tmp_path):
    """Multi-host in miniature: jax.distributed over 2 local processes (4 CPU devices each, gloo collectives)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    mp = tmp_path / "mp"
    _wait(*[_child("operators", 4, method="genome", result=str(mp) + ".npz", report=str(mp) + ".json",
                   processes=2, process_id=pid, coordinator=coordinator) for pid in range(2)])
    report = json.loads(Path(str(mp) + ".json").read_text())
    assert (report["processes"], report["devices"], report["local_devices"]) == (2, 8, 4)
    assert report["layout"][POP_A] == [8, ["pop"]]
    _assert_identical(_load(str(mp) + ".npz"), _result(runs, "ref", "loop")[0])


def test_layout_rules_in_process():
    """Which leaves are split (the fields a state declares in POPULATION_FIELDS) and which are replicated; runs on
    whatever devices exist."""
    import jax

    from genome_jax import sharding
    from genome_jax.synthetic import synthetic_experts

    strategy, params = _strategy("genome_plus")
    mesh = sharding.population_mesh(n_devices=1)
    experts = synthetic_experts(0)
    template = strategy.state_template(jax.eval_shape(lambda: strategy.initial_population(jax.random.PRNGKey(0),
                                                                                          experts)), params)
    sh = sharding.state_shardings(template, mesh)
    split = jax.sharding.PartitionSpec("pop")
    for field in ("population", "velocity", "pbest"):  # GenomePlusState.POPULATION_FIELDS
        assert all(s.spec == split for s in jax.tree_util.tree_leaves(getattr(sh, field))), field
    # everything else whole, even P-sized vectors and the individual-shaped best / worst
    for field in ("fitness", "pbest_fitness", "child_source", "child_alive", "size", "best", "worst", "generation"):
        assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree_util.tree_leaves(getattr(sh, field)))
    abstract = sharding.abstract_tree(template, sh)
    assert abstract.fitness.shape == (16,) and abstract.fitness.sharding == sh.fitness
    placed = sharding.place({"pop": np.arange(16.0).reshape(8, 2)}, {"pop": sharding.population_sharding(mesh)})
    assert np.array_equal(np.asarray(placed["pop"]), np.arange(16.0).reshape(8, 2))
    assert not sharding.initialize_distributed()  # no cluster configured: a no-op


def child_batch(a: dict) -> None:
    """Several jobs in one process (JAX starts once per device count: the slow part of every child)."""
    for job in a["jobs"]:
        {"run": child_run, "operators": child_operators, "errors": child_errors}[job["kind"]](dict(job, devices=a["devices"]))


if __name__ == "__main__":
    {"run": child_run, "operators": child_operators, "errors": child_errors, "batch": child_batch}[sys.argv[1]](
        json.loads(sys.argv[2]))
