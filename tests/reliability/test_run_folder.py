"""One writer per run folder, a stale lock, changed data on resume, and the graceful stop seen from outside.

- Two `genome run` on one --output_dir: the second is refused at once (exit 1, one line naming the folder and the
  first one's pid) and the first finishes unchanged (bit for bit like the uninterrupted reference).
- A lock file left by a dead run never blocks the resume (the kernel released its flock).
- The data a run started with is part of its identity: a changed expert file (or task file) refuses the resume with
  one line naming the file, unless --allow-data-change, which result.json records.
- SIGINT from outside (Ctrl-C) mid-run: exit 130 within a few seconds with the one line; a second signal during the
  clean-up exits at once.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rel_helpers import REPO, SYNTHETIC, assert_same_outcome, describe, genome, metrics, orphans

LOCK = ".genome-run.lock"


def _popen(args, env=None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("GENOME_FAULT_POINT", "GENOME_FAULT_TRACE")}
    full.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "scripts.cli", *map(str, args)], cwd=REPO, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_stopped(pid: int, timeout: float = 120) -> None:
    """Until process pid is stopped (SIGSTOP sent by a fault point)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not reach its stop point")


def test_second_run_on_a_busy_folder_is_refused_at_once(tmp_path, synthetic_reference):
    ref, _ = synthetic_reference("genome")
    out = tmp_path / "run"
    args = [*SYNTHETIC, "--output_dir", out]
    first = _popen(args, env={"GENOME_FAULT_POINT": "checkpoint_committed:2:STOP"})  # pauses holding the lock
    try:
        _wait_stopped(first.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        second = genome(args)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the second run's own CPU time (load-independent)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    assert second.returncode == 1, describe(second)
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and f"pid {first.pid}" in lines[0], describe(second)
    assert second.stdout == ""
    assert cpu < 1.0, f"the refusal cost {cpu:.1f}s of CPU (it must come before any work, even importing JAX)"
    assert first.returncode == 0, f"rc={first.returncode}\n{out1}\n{err1}"
    assert_same_outcome(ref, out)  # the first run finished unchanged
    assert orphans(out) == []


def test_stale_lock_of_a_dead_run_never_blocks_the_resume(tmp_path, synthetic_reference):
    ref, _ = synthetic_reference("genome")
    out = tmp_path / "run"
    args = [*SYNTHETIC, "--output_dir", out]
    p = genome(args, env={"GENOME_FAULT_POINT": "checkpoint_committed:3"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK).write_text(f"{dead.pid}\n")  # names a process that no longer exists
    r = genome(args)
    assert r.returncode == 0, describe(r)
    assert_same_outcome(ref, out)


def _tiny_experts(where: Path, n: int = 3, d: int = 16, rank: int = 2) -> Path:
    from safetensors.numpy import save_file

    for i in range(n):
        rng = np.random.default_rng(50 + i)
        t = {}
        for layer in range(2):
            k = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            t[f"{k}.lora_A.weight"] = rng.standard_normal((rank, d)).astype(np.float32) * 0.1
            t[f"{k}.lora_B.weight"] = rng.standard_normal((d, rank)).astype(np.float32) * 0.1
        f = where / f"e{i}"
        f.mkdir(parents=True)
        (f / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": rank,
            "lora_alpha": rank, "target_modules": ["q_proj"], "bias": "none"}))
        save_file(t, str(f / "adapter_model.safetensors"))
    return where


def test_changed_expert_file_refuses_the_resume_unless_allowed(tmp_path):
    experts = _tiny_experts(tmp_path / "experts")
    out = tmp_path / "run"
    args = [*SYNTHETIC, "--max_iter", "3", "--lora_dir", experts, "--output_dir", out]
    p = genome(args, env={"GENOME_FAULT_POINT": "checkpoint_committed:2"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    saved = json.loads((out / "run_config.json").read_text())["data_sha256"]
    changed = experts / "e1" / "adapter_model.safetensors"
    assert str(changed) in saved and len(saved) == 6  # 3 experts x (config, weights)
    from safetensors.numpy import load_file, save_file

    t = load_file(str(changed))
    k = sorted(t)[0]
    t[k] = t[k] * 1.5
    save_file(t, str(changed))
    before = sorted(p.name for p in out.rglob("*"))
    r = genome(args)
    assert r.returncode == 1, describe(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(changed) in lines[0] and "--allow-data-change" in lines[0], describe(r)
    assert sorted(p.name for p in out.rglob("*")) == before  # refused before any work
    r = genome([*args, "--allow-data-change"])
    assert r.returncode == 0, describe(r)
    assert "Traceback" not in r.stderr
    assert f"resuming {out} from generation 1" in r.stdout, describe(r)
    result = json.loads((out / "result.json").read_text())
    assert result["allow_data_change"] is True
    assert [c["file"] for c in result["data_changed"]] == [str(changed)]
    assert result["data_changed"][0]["was"] == saved[str(changed)] != result["data_changed"][0]["now"]
    assert [m["generation"] for m in metrics(out)] == [0, 1, 2, 3]


def test_changed_task_file_refuses_the_resume(tmp_path, model_path):
    """A real task (a copy of the shipped arc_c file): the saved digests are checked before any model is loaded."""
    from scripts import run_loop
    from genome_jax.run_config import save_run_config

    task = tmp_path / "my_task.json"
    task.write_bytes((REPO / "evaluators" / "data" / "arc_c.json").read_bytes())
    experts = _tiny_experts(tmp_path / "experts")
    out = tmp_path / "run"
    flags = ["--tasks", str(task), "--lora_dir", str(experts), "--model_path", str(model_path),
             "--population_size", "4", "--max_iter", "2", "--output_dir", str(out)]
    cfg, _ = run_loop.prepare({"tasks": [str(task)], "lora_dir": str(experts), "model_path": str(model_path),
                               "population_size": 4, "max_iter": 2, "output_dir": str(out)})
    out.mkdir()
    save_run_config(cfg, out / "run_config.json", data=run_loop.data_digests(cfg))  # as a run's start writes it
    assert str(task) in json.loads((out / "run_config.json").read_text())["data_sha256"]
    data = json.loads(task.read_text())
    task.write_text(json.dumps(data, indent=1))  # same items, other bytes: still another file than the run's
    r = genome(["run", *flags, "--quiet"])
    assert r.returncode == 1, describe(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"genome: error: {task} changed since the run"), describe(r)


STOPPER = textwrap.dedent("""
    import os, signal, sys, time
    from genome_jax.stopping import Stopped, graceful_stop
    try:
        with graceful_stop(lambda: "after step 7"):
            try:
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
                time.sleep(5)
                print("not stopped")
            finally:
                if sys.argv[2] == "twice":  # a second signal during the clean-up: out at once
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                    print("clean-up finished")
    except Stopped as e:
        print(e.line(), file=sys.stderr)
        sys.exit(e.exit_code)
""")


@pytest.mark.parametrize("sig,times,rc", [("SIGTERM", "once", 143), ("SIGINT", "once", 130),
                                           ("SIGINT", "twice", 143)])
def test_graceful_stop_one_line_and_second_signal(tmp_path, sig, times, rc):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", STOPPER, sig, times], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == rc, describe(p)
    assert time.perf_counter() - t0 < 10  # the sleeps (5 s) never ran to their end
    assert p.stdout == ""
    if times == "once":
        assert p.stderr.splitlines() == [f"genome: stopped by {sig} after step 7; re-run the same command to resume"]
    else:
        assert p.stderr.splitlines() == ["genome: stopped by SIGTERM (second signal: exiting at once); re-run the "
                                         "same command to resume"]


def test_sigint_from_outside_stops_a_run_within_seconds(tmp_path, synthetic_reference):
    """Ctrl-C (SIGINT) sent to a running `genome run` between generations: exit 130 within a few seconds, one line;
    the re-run ends like the uninterrupted run."""
    ref, _ = synthetic_reference("genome")
    out = tmp_path / "run"
    args = [*SYNTHETIC, "--output_dir", out]
    p = _popen(args)
    for line in p.stdout:
        if line.startswith("gen 1/"):
            break
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    took = time.perf_counter() - t0
    assert p.returncode == 130, err
    assert took < 15, f"stopping took {took:.1f}s"  # a few seconds idle; slack for a loaded CI machine
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("genome: stopped by SIGINT after generation "), err
    r = genome(args)
    assert r.returncode == 0, describe(r)
    assert_same_outcome(ref, out)
    assert orphans(out) == []


QUIET = textwrap.dedent("""
    import logging, threading
    from scripts import quiet_errors
    quiet_errors.install()
    def background():
        try:
            raise ValueError("Requested byte range [0, 99) is not valid")
        except ValueError:
            logging.getLogger("absl").exception("deserialisation failed")  # as orbax does, from its threads
        logging.getLogger("genome_jax.checkpoint").warning("checkpoint step 3 is corrupt\\nsecond line")
        raise RuntimeError("a thread dies")
    t = threading.Thread(target=background)
    t.start(); t.join()
    print(quiet_errors.log_path())
""")


def test_library_tracebacks_go_to_the_log_file_not_stderr(tmp_path):
    p = subprocess.run([sys.executable, "-c", QUIET], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO), "GENOME_LOG_DIR": str(tmp_path)})
    assert p.returncode == 0, describe(p)
    assert p.stderr.splitlines() == ["checkpoint step 3 is corrupt"], describe(p)  # ours: one line
    log = Path(p.stdout.strip()).read_text()
    assert "Requested byte range" in log and log.count("Traceback") == 2 and "a thread dies" in log


def test_internal_error_is_one_line_with_the_log_file(tmp_path, monkeypatch, capsys):
    from scripts import cli, inspect_cmd, quiet_errors

    def boom(args):
        raise RuntimeError("something we did not foresee\nwith a second line")

    monkeypatch.setenv("GENOME_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(quiet_errors, "_path", None)
    monkeypatch.setattr(inspect_cmd, "run", boom)
    rc = cli.main(["inspect", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 3
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("genome: internal error: RuntimeError: something we did not "
                                                   "foresee (traceback in "), err
    path = Path(lines[0].split("traceback in ")[1].split(";")[0])
    assert path.parent == tmp_path and "Traceback" in path.read_text() and "boom" in path.read_text()
