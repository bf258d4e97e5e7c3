"""`genome run` placement flags: --devices (population sharded over local JAX devices), --eval_devices (one vLLM
worker per GPU), --ray_address / --ray_actors (Ray actors). Bad values and combinations are refused before any work;
a sharded synthetic run ends where the unsharded one does, and a run killed on 2 devices resumes on 1.

Multi-device runs need XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts, so they run the real
CLI in child processes (the pytest process has one CPU device). The vLLM / Ray paths themselves are tested in
tests/evaluators; here we check what reaches `make_evaluator`.
"""
from __future__ import annotations

import base64
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ refused in-process
CASES = [
    # (id, extra argv, substring of the one-line message)
    ("devices-word", ["--devices", "two"], "argument --devices: expected a number of devices or 'all', got 'two'"),
    ("devices-negative", ["--devices", "-2"], "--devices must be >= 0 (0: unsharded) or 'all', got -2"),
    ("devices-more-than-jax-sees", ["--devices", "2"], "--devices 2: JAX sees 1 local device(s) here"),
    ("eval-devices-jax-backend", ["--eval_devices", "0,1", "--backend", "jax"], "--eval_devices needs --backend vllm"),
    ("eval-devices-endpoints", ["--eval_devices", "0,1", "--endpoints", "http://h:8000"],
     "--eval_devices cannot be combined with --endpoints"),
    # the evaluators' messages name the parameter (eval_devices); the CLI may show it as the flag
    ("eval-devices-twice", ["--eval_devices", "0,1,0"], "eval_devices: device 0 is listed twice"),
    ("eval-devices-bad-id", ["--eval_devices", "0,gpu1"], "eval_devices: 'gpu1' is not a device index or GPU UUID"),
    ("eval-devices-empty-item", ["--eval_devices", "0,,1"], "expected a comma-separated list such as 0,1,2,3"),
    ("ray-jax-backend", ["--ray_address", "local", "--backend", "jax"], "--ray_address needs --backend vllm"),
    ("ray-endpoints", ["--ray_address", "auto", "--endpoints", "http://h:8000"],
     "--ray_address cannot be combined with --endpoints"),
    ("ray-and-eval-devices", ["--ray_address", "auto", "--eval_devices", "0,1"],
     "--ray_address cannot be combined with --eval_devices"),
    ("ray-bad-address", ["--ray_address", "http://head:10001"],
     "--ray_address 'http://head:10001': expected local, auto or ray://host:port"),
    ("ray-actors-alone", ["--ray_actors", "4"], "--ray_actors needs --ray_address"),
    ("ray-actors-zero", ["--ray_address", "local", "--ray_actors", "0"], "--ray_actors must be at least 1, got 0"),
    ("ray-actors-word", ["--ray_address", "local", "--ray_actors", "many"], "invalid int value: 'many'"),
    ("config-devices-type", ["--config", "@tasks: [synthetic]\ndevices: 1.5\n"], "'devices' must be an integer or 'all'"),
    ("config-eval-devices-type", ["--config", "@tasks: [synthetic]\neval_devices: {a: 1}\n"],
     "'eval_devices' must be a comma-separated list of devices"),
]


@pytest.mark.parametrize("case_id, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_placement_flags_exit_1_with_one_line(tmp_path, capsys, case_id, argv, message):
    out = tmp_path / "out"
    args = []
    for a in argv:
        if a.startswith("@"):
            (tmp_path / "cfg.yaml").write_text(a[1:])
            a = str(tmp_path / "cfg.yaml")
        args.append(a)
    if "--config" not in args:
        args = ["--tasks", "synthetic", *args]
    rc, _, stderr = run_cli(["run", *args, "--output_dir", str(out)], capsys)
    assert rc == 1, (rc, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genome: error: "), stderr
    assert message in lines[0], lines[0]
    assert not out.exists()


def test_population_that_does_not_split_is_refused_before_work(tmp_path):
    """The device count is only known to JAX: a child process with 2 CPU devices, a population of 5."""
    out = tmp_path / "o"
    p = _genome([*BASE[:2], "--population_size", "5", "--devices", "2", "--output_dir", out], devices=2)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "genome: error: --devices 2: population size 5 does not split over 2 devices; use a multiple of 2 "
        "(or fewer devices, e.g. 1)")
    assert not out.exists()


# ------------------------------------------------------------------------------ what the evaluator is given
def test_placement_values_reach_make_evaluator(tmp_path):
    from genome_jax.run_config import load_run_config
    from scripts import run_loop, scoring

    cfg = load_run_config({"tasks": ["synthetic"], "eval_devices": " 0, 1,GPU-ab12 "})
    assert cfg.eval_devices == " 0, 1,GPU-ab12 "
    cfg, _ = run_loop.prepare({"tasks": ["synthetic"], "eval_devices": " 0, 1,GPU-ab12 ",
                               "output_dir": str(tmp_path / "a")})
    assert cfg.eval_devices == "0,1,GPU-ab12"  # canonical, as the evaluators parse it
    kw = scoring.evaluator_kwargs(cfg, rank=4)
    assert kw == {"endpoints": None, "eval_mode": "auto", "max_lora_rank": 16, "retries": scoring.EVAL_RETRIES,
                  "eval_devices": "0,1,GPU-ab12"}

    cfg, _ = run_loop.prepare({"tasks": ["synthetic"], "ray_address": "ray://head:10001", "ray_actors": 3,
                               "eval_mode": "lora", "output_dir": str(tmp_path / "b")})
    kw = scoring.evaluator_kwargs(cfg, rank=32)
    # Ray replaces lost actors itself: no `retries` (RayBackend takes none)
    assert kw == {"endpoints": None, "eval_mode": "lora", "max_lora_rank": 32, "ray_address": "ray://head:10001",
                  "ray_actors": 3}
    # and make_evaluator takes every key (no `retries` for RayBackend, which would refuse it)
    import inspect

    from evaluators.backends import make_evaluator

    assert set(kw) <= set(inspect.signature(make_evaluator).parameters)

    # the default: one managed worker, retried after a crash; no placement keys
    cfg, _ = run_loop.prepare({"tasks": ["synthetic"], "output_dir": str(tmp_path / "c")})
    assert scoring.evaluator_kwargs(cfg, rank=8) == {"endpoints": None, "eval_mode": "auto", "max_lora_rank": 16,
                                                       "retries": scoring.EVAL_RETRIES}
    assert (cfg.devices, cfg.eval_devices, cfg.ray_address, cfg.ray_actors) == (0, None, None, None)
    # --eval_dtype float32 reaches the engine (ManagedBackend / DevicePoolBackend / RayBackend take `dtype`)
    cfg, _ = run_loop.prepare({"tasks": ["synthetic"], "eval_dtype": "float32", "output_dir": str(tmp_path / "d")})
    assert scoring.evaluator_kwargs(cfg, rank=8)["dtype"] == "float32"


def test_config_file_spellings(tmp_path):
    from genome_jax.run_config import load_run_config

    f = tmp_path / "c.yaml"
    f.write_text("tasks: [synthetic]\ndevices: all\neval_devices: [0, 1, 2]\n")
    cfg = load_run_config({}, f)
    assert cfg.devices == -1 and cfg.eval_devices == "0,1,2"
    f.write_text("tasks: [synthetic]\ndevices: 1\neval_devices: 3\nray_actors: 2\n")
    with pytest.raises(Exception, match="ray_actors needs ray_address"):
        load_run_config({}, f)
    toml = tmp_path / "c.toml"
    toml.write_text("tasks = ['synthetic']\nray_address = 'auto'\nray_actors = 2\ndevices = 'all'\n")
    cfg = load_run_config({}, toml)
    assert (cfg.ray_address, cfg.ray_actors, cfg.devices) == ("auto", 2, -1)
    # `--devices all` on this one-device process: a 1-device mesh, valid
    from scripts import run_loop

    cfg, _ = run_loop.prepare({"tasks": ["synthetic"], "devices": -1, "population_size": 5,
                               "output_dir": str(tmp_path / "o")})
    assert cfg.devices == -1


def test_placement_may_change_on_resume(tmp_path):
    """Placement is not part of the run identity: the same folder accepts other devices / engines."""
    from genome_jax.run_config import RESUME_MAY_CHANGE, describe_mismatch, load_run_config, save_run_config
    from scripts import run_loop

    assert {"devices", "eval_devices", "ray_address", "ray_actors"} <= set(RESUME_MAY_CHANGE)
    a = load_run_config({"tasks": ["synthetic"], "devices": 2})
    b = load_run_config({"tasks": ["synthetic"], "ray_address": "auto", "ray_actors": 2})
    assert describe_mismatch(a, b) == ""
    assert describe_mismatch(a, load_run_config({"tasks": ["synthetic"], "seed": 1})) == "seed: 42 -> 1"
    out = tmp_path / "run"
    out.mkdir()
    save_run_config(load_run_config({"tasks": ["synthetic"], "population_size": 4, "devices": 2,
                                     "eval_devices": "0,1"}), out / "run_config.json")
    cfg, _ = run_loop.prepare({"tasks": ["synthetic"], "population_size": 4, "devices": 1,
                               "output_dir": str(out)})
    assert cfg.devices == 1 and cfg.eval_devices is None
    # --resume keeps the saved placement unless a flag overrides it
    cfg, _ = run_loop.prepare({"devices": 1}, resume_dir=str(out))
    assert cfg.devices == 1 and cfg.eval_devices == "0,1"


# -------------------------------------------------------------------------------- real sharded runs (children)
# P = 6 over 2 devices; the synthetic TEST PROBLEM's experts have rank 4 and 4 rows, so no other leaf is mistaken
# for a population axis. TIES merges (the default), as in test_sharding.py: bit-identical when partitioned. (Linear
# merges are not: some children differ in the last bit once partitioned; see docs/SCALING.md "Not done".)
BASE = ["--tasks", "synthetic", "--population_size", "6",
        "--individual_mutation_rate", "0.8", "--gene_mutation_rate", "0.3", "--sigma", "0.05",
        "--elite_percent", "0.2", "--seed", "7", "--max_iter", "3", "--quiet"]
# XLA fuses a partitioned program differently; with FMA contraction off the same arithmetic gives the same bits
# (see tests/genome_jax/test_sharding.py): x86 max ISA AVX predates FMA3.
NO_FMA = "--xla_cpu_max_isa=AVX" if platform.machine() in ("x86_64", "AMD64") else ""


def _genome(args, *, devices: int, fault: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GENOME_FAULT_POINT", "GENOME_FAULT_TRACE")}
    env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", GENOME_JAX_COMPILE_CACHE="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {NO_FMA}".strip())
    if fault:
        env["GENOME_FAULT_POINT"] = fault
    return subprocess.run([sys.executable, "-m", "scripts.cli", "run", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


def _layout(out: Path, step: int) -> dict[str, tuple[int, list]]:
    """{state leaf: (devices of its mesh, partition spec)} as orbax recorded the arrays it wrote at `step`
    (a single-device array: (1, None))."""
    raw = json.loads((out / "checkpoints" / str(step) / "state" / "_sharding").read_text())
    out_ = {}
    for k, v in raw.items():
        name = base64.b64decode(k).decode()
        v = json.loads(v) if isinstance(v, str) else v
        if v.get("sharding_type") == "NamedSharding":
            out_[name] = (len(v["device_mesh"]["mesh"]), v["partition_spec"])
        else:
            out_[name] = (1, None)
    return out_


def _leaves(out: Path):
    """(step, {leaf path: numpy array}) of the newest checkpoint of a run folder, restored onto this process's
    one device (whatever device count wrote it)."""
    import jax

    from scripts.run_loop import saved_state

    r = saved_state(out)
    assert r is not None
    return r.step, {jax.tree_util.keystr(p): np.asarray(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(r.state)[0]}


def _assert_same_run(ref: Path, out: Path) -> None:
    """Final state bit for bit; same best adapter bytes."""
    (sa, a), (sb, b) = _leaves(ref), _leaves(out)
    assert sa == sb == 3
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True), f"state leaf {k} differs"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "best_adapter" / name).read_bytes() == (ref / "best_adapter" / name).read_bytes(), name
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert ra["best"]["dev_fitness"] == rb["best"]["dev_fitness"] and rb["generations"] == 3
    ma, mb = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out))
    assert [(r["generation"], r["best"], r["worst"], r["best_ever"]) for r in ma] == \
        [(r["generation"], r["best"], r["worst"], r["best_ever"]) for r in mb]


POP_A = "population.model.layers.0.self_attn.q_proj.A"  # a population leaf, as orbax names it


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unsharded run (--devices 0, default) in a child with the same XLA flags as the sharded ones."""
    out = tmp_path_factory.mktemp("scale") / "ref"
    _ok(_genome([*BASE, "--output_dir", out], devices=2))
    return out


def test_sharded_run_equals_unsharded(reference, tmp_path):
    out = tmp_path / "d2"
    _ok(_genome([*BASE, "--devices", "2", "--output_dir", out], devices=2))
    # the population really was split over the 2 devices (orbax's record of the arrays it saved) ...
    lay = _layout(out, 3)
    assert lay[POP_A] == (2, ["pop"])
    assert lay["fitness"] == (2, [])  # P numbers: whole on every device
    assert _layout(reference, 3)[POP_A] == (1, None)  # ... and the reference's was not
    _assert_same_run(reference, out)
    assert json.loads((out / "run_config.json").read_text())["devices"] == 2


def test_killed_on_2_devices_resumes_on_1(reference, tmp_path):
    out = tmp_path / "k"
    # SIGKILL right after generation 1's checkpoint committed (the 1st commit is generation 0's)
    p = _genome([*BASE, "--devices", "2", "--output_dir", out], devices=2, fault="checkpoint_committed:2")
    assert p.returncode == -9, f"rc={p.returncode}\n{p.stderr[-3000:]}"
    steps = sorted(int(s.name) for s in (out / "checkpoints").iterdir() if s.name.isdigit())
    assert steps[-1] == 1 and not (out / "result.json").exists()
    assert _layout(out, 1)[POP_A] == (2, ["pop"])
    # the saved --devices 2 cannot run where JAX sees one device ...
    p = _genome(["--resume", out], devices=1)
    assert p.returncode == 1 and "--devices 2: JAX sees 1 local device(s)" in p.stderr, p.stderr
    # ... --devices 1 restores the 2-device checkpoint straight onto one device and continues
    p = _genome(["--resume", out, "--devices", "1", "--quiet"], devices=1)
    _ok(p)
    assert "resuming" in p.stdout and "from generation 1" in p.stdout
    assert _layout(out, 3)[POP_A] == (1, ["pop"])
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 1
    _assert_same_run(reference, out)
