"""Bad inputs through the real `genome` CLI (a subprocess each): adapters, task files, configs and flags, environment.

Every row must be refused with exit status 1, exactly one line on stderr that starts with `genome: error:` and names
the culprit, no Python traceback, and its output folder as it was (absent stays absent, a user's folder untouched).
Nearly every row is refused before any work; the rows that need the real model only read its config and weight
headers. The rows run two at a time (subprocesses) to keep CI short.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import http.server
import json
import os
import pickle
import re
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest

from rel_helpers import describe, genome, real_shaped_experts


@dataclasses.dataclass
class Case:
    argv: list  # after `genome`
    culprit: str  # regex the error line must match (it names the culprit)
    out: Path  # the output folder of the command: must be left as it was
    after: Callable[[], None] | None = None  # extra check (e.g. a pickle payload never ran)


class Ctx:
    """What the rows build on: a private folder per row, the `toy` adapters, the real model (config/headers only)."""

    def __init__(self, root: Path, toy, model_path: Callable[[], Path], server_url: Callable[[], str]):
        self.root, self.toy, self._model, self.server_url = root, toy, model_path, server_url
        root.mkdir(parents=True, exist_ok=True)

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def model(self) -> Path:
        return self._model()

    def real_pop(self, where: Path, rank: int = 4, n: int = 2) -> Path:
        """n valid PEFT folders for the real model (q_proj of layers 0-1)."""
        return real_shaped_experts(where, self.model, n=n, rank=rank)


def _synthetic(lora_dir, out) -> list:
    return ["run", "--tasks", "synthetic", "--lora_dir", lora_dir, "--population_size", "4", "--max_iter", "2",
            "--output_dir", out, "--quiet"]


def _adapter(kind: str) -> Callable[[Ctx], Case]:
    """A broken population from the shared `toy` fixture (tests/conftest.py), run on the synthetic problem."""
    def build(c: Ctx) -> Case:
        lora_dir, regex = c.toy.bad_case(kind, c.dir("row") / "pop")
        out = c.root / "out"
        return Case(_synthetic(lora_dir, out), regex, out)
    return build


class _Payload:
    """Unpickling this creates a marker file: proof of code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pickle(c: Ctx, folder: Path) -> Path:
    marker = c.root / "PWNED"
    c.toy.write(folder, c.toy.cfg(), None)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return marker


def _run_pickle(c: Ctx) -> Case:
    pop = c.dir("pop")
    c.toy.write(pop / "a_good", c.toy.cfg(), c.toy.tensors())
    marker = _malicious_pickle(c, pop / "b")
    out = c.root / "out"

    def never_unpickled():
        assert not marker.exists(), "the pickle payload ran"
    return Case(_synthetic(pop, out), r"b/adapter_model\.bin: pickle weights refused", out, never_unpickled)


def _eval_pickle(c: Ctx) -> Case:
    folder = c.dir("evil")
    marker = _malicious_pickle(c, folder)
    out = c.root / "cache"

    def never_unpickled():
        assert not marker.exists(), "the pickle payload ran"
    return Case(["eval", "--model_path", c.model, "--adapter", folder, "--tasks", "arc_c", "--n", "1",
                 "--cache_dir", out], r"evil/adapter_model\.bin: pickle weights refused", out, never_unpickled)


def _other_model(c: Ctx) -> Case:
    pop = c.dir("pop")
    for i in range(2):
        c.toy.write(pop / f"e{i}", c.toy.cfg(), c.toy.tensors(seed=i))
    out = c.root / "out"
    return Case(["run", "--tasks", "arc_c", "--lora_dir", pop, "--model_path", c.model, "--output_dir", out,
                 "--quiet"], r"--lora_dir .*pop: the experts' ΔW for model\.layers\.0\.self_attn\.q_proj is 4 x 6 "
                             r"but the weight of --model_path .* is 576 x 576", out)


def _rank_above_max(c: Ctx) -> Case:
    pop = c.real_pop(c.dir("pop"), rank=32, n=1)
    out = c.root / "cache"
    return Case(["eval", "--model_path", c.model, "--adapter", pop / "expert0", "--tasks", "arc_c", "--n", "1",
                 "--max_lora_rank", "16", "--cache_dir", out],
                r"expert0: LoRA rank 32 is above max_lora_rank=16", out)


def _expert_name(c: Ctx) -> Case:
    out = c.root / "experts"
    return Case(["train-experts", "--out", out, "--experts", "../evil=arc_c"],
                r"--experts entry '\.\./evil=arc_c': invalid expert name '\.\./evil'", out)


def _task_file(name: str, content: str, regex: str) -> Callable[[Ctx], Case]:
    def build(c: Ctx) -> Case:
        f = c.dir("tasks") / f"{name}.json"
        f.write_text(content)
        pop = c.dir("pop")
        for i in range(2):
            c.toy.write(pop / f"e{i}", c.toy.cfg(), c.toy.tensors(seed=i))
        out = c.root / "out"
        return Case(["run", "--tasks", f, "--lora_dir", pop, "--output_dir", out, "--quiet"], regex, out)
    return build


_MC = {"question": "2+2?", "choices": {"A": "4", "B": "5"}, "answer": "A"}


def _flags(argv: list, regex: str, config: str | None = None) -> Callable[[Ctx], Case]:
    def build(c: Ctx) -> Case:
        out = c.root / "out"
        pop = c.dir("pop")
        for i in range(2):
            c.toy.write(pop / f"e{i}", c.toy.cfg(), c.toy.tensors(seed=i))
        extra = []
        if config is not None:
            f = c.root / "run.yaml"
            f.write_text(config)
            extra = ["--config", f]
        args = [str(pop) if a == "{pop}" else a for a in argv]
        return Case(["run", *args, *extra, "--output_dir", out, "--quiet"], regex, out)
    return build


def _no_model(c: Ctx) -> Case:
    pop = c.real_pop(c.dir("pop"))
    out = c.root / "out"
    return Case(["run", "--tasks", "arc_c", "--lora_dir", pop, "--model_path", c.root / "no-such-model",
                 "--output_dir", out, "--quiet"], r"--model_path .*no-such-model: no such folder", out)


def _empty_model(c: Ctx) -> Case:
    pop = c.real_pop(c.dir("pop"))
    model = c.dir("empty-model")
    out = c.root / "out"
    return Case(["run", "--tasks", "arc_c", "--lora_dir", pop, "--model_path", model, "--output_dir", out,
                 "--quiet"], r"--model_path .*empty-model: no config\.json there", out)


def _remote_code_model(c: Ctx) -> Case:
    model = c.dir("custom-model")
    marker = c.root / "CUSTOM_CODE_RAN"
    cfg = json.loads((c.model / "config.json").read_text())
    cfg.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    pop = c.real_pop(c.dir("pop"))
    out = c.root / "out"

    def never_ran():
        assert not marker.exists(), "custom model code ran"
    return Case(["run", "--tasks", "arc_c", "--lora_dir", pop, "--model_path", model, "--output_dir", out,
                 "--quiet"], r"custom-model/config\.json: the model needs custom code \(auto_map\)", out, never_ran)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def _unreachable(c: Ctx) -> Case:
    pop = c.real_pop(c.dir("pop"))
    out = c.root / "out"
    url = f"http://127.0.0.1:{_closed_port()}"
    return Case(["run", "--tasks", "arc_c", "--lora_dir", pop, "--model_path", c.model, "--endpoints", url,
                 "--output_dir", out, "--quiet"], rf"endpoints: endpoint {re.escape(url)} is unreachable", out)


def _port_taken(c: Ctx) -> Case:
    """--endpoints pointing at a port another program holds (a plain HTTP server, not vLLM)."""
    pop = c.real_pop(c.dir("pop"))
    out = c.root / "out"
    url = c.server_url()
    return Case(["run", "--tasks", "arc_c", "--lora_dir", pop, "--model_path", c.model, "--endpoints", url,
                 "--output_dir", out, "--quiet"], rf"endpoints: endpoint {re.escape(url)}/v1/models answered HTTP 404",
                out)


def _output_is_file(c: Ctx) -> Case:
    out = c.root / "out"
    out.write_text("my notes")
    return Case(["run", "--tasks", "synthetic", "--output_dir", out, "--quiet"], r"out: exists and is not a folder",
                out)


def _output_foreign(c: Ctx) -> Case:
    out = c.dir("out")
    (out / "thesis.tex").write_text("keep me")
    return Case(["run", "--tasks", "synthetic", "--output_dir", out, "--quiet"],
                r"out: folder is not empty and holds no genome run", out)


ROWS: dict[str, Callable[[Ctx], Case]] = {
    # adapters
    "adapter-nan": _adapter("nan"),
    "adapter-inf": _adapter("inf"),
    "adapter-wrong-shape": _adapter("d_in_mismatch"),
    "adapter-rank-disagrees-with-config": _adapter("rank_vs_config"),
    "adapter-mixed-base-models": _adapter("base_model"),
    "adapter-different-target-modules": _adapter("target_modules"),
    "adapter-pickle-weights": _adapter("pickle"),
    "adapter-malicious-pickle": _run_pickle,
    "adapter-malicious-pickle-eval": _eval_pickle,
    "adapter-symlink-escaping-lora-dir": _adapter("symlink_escape"),
    "adapter-config-invalid-json": _adapter("invalid_json"),
    "adapter-config-missing": _adapter("missing_config"),
    "adapter-not-lora": _adapter("not_lora"),
    "adapter-dora": _adapter("dora"),
    "adapter-corrupt-safetensors": _adapter("corrupt_safetensors"),
    "adapter-foreign-tensor": _adapter("foreign_tensor"),
    "adapter-empty-lora-dir": _adapter("empty"),
    "adapter-for-another-model": _other_model,
    "adapter-rank-above-server-max": _rank_above_max,
    "name-with-path-separators": _expert_name,
    # task files
    "task-invalid-json": _task_file("broken", '{"dev": [', r"broken\.json: invalid JSON at line 1"),
    "task-missing-field": _task_file("nofield", json.dumps({"dev": [{k: v for k, v in _MC.items() if k != "answer"}],
                                                            "test": [_MC]}),
                                     r"nofield\.json: dev item 0: missing field 'answer'"),
    "task-answer-not-among-choices": _task_file("badanswer", json.dumps({"dev": [{**_MC, "answer": "C"}],
                                                                         "test": [_MC]}),
                                                r"badanswer\.json: dev item 0: answer 'C' is not one of the choices"),
    "task-empty-split": _task_file("nodev", json.dumps({"dev": [], "test": [_MC]}),
                                   r"nodev\.json: split 'dev' is empty"),
    "task-bad-item-in-test-split": _task_file("badtest", json.dumps({"dev": [_MC], "test": [{**_MC, "choices": {}}]}),
                                              r"badtest\.json: test item 0: 'choices' must map at least two labels"),
    "task-not-an-object": _task_file("alist", json.dumps([_MC]), r"alist\.json: a task file must be a JSON object"),
    "task-unknown-name": _flags(["--tasks", "mmlu", "nosuchtask", "--lora_dir", "{pop}"], r"unknown task 'nosuchtask'"),
    # configs and flags
    "config-unknown-key": _flags([], r"run\.yaml: unknown key 'populaton_size'",
                                 config="tasks: [synthetic]\npopulaton_size: 4\n"),
    "config-wrong-type": _flags([], r"run\.yaml: 'sigma' must be a number, got str 'high'",
                                config="tasks: [synthetic]\nsigma: high\n"),
    "config-invalid-yaml": _flags([], r"run\.yaml: cannot parse", config="tasks: [synthetic\n"),
    "flag-wrong-type": _flags(["--tasks", "synthetic", "--population_size", "ten"],
                              r"argument --population_size: invalid int value: 'ten'"),
    "weights-count-mismatch": _flags(["--tasks", "mmlu", "arc_c", "--task_weights", "1", "--lora_dir", "{pop}"],
                                     r"--task_weights has 1 value\(s\) but --tasks has 2"),
    "weights-summing-to-zero": _flags(["--tasks", "mmlu", "arc_c", "--task_weights", "0", "0", "--lora_dir", "{pop}"],
                                      r"--task_weights must not all be 0"),
    "weights-negative": _flags(["--tasks", "mmlu", "arc_c", "--task_weights", "2", "-1", "--lora_dir", "{pop}"],
                               r"--task_weights must be finite and >= 0"),
    "rate-negative": _flags(["--tasks", "synthetic", "--cross_rate", "-0.1"], r"--cross_rate must be in \[0, 1\]"),
    "rate-above-one-in-config": _flags([], r"--gene_mutation_rate must be in \[0, 1\], got 1\.5",
                                       config="tasks: [synthetic]\ngene_mutation_rate: 1.5\n"),
    "population-of-1": _flags(["--tasks", "synthetic", "--population_size", "1"],
                              r"--population_size must be at least 2, got 1"),
    "unknown-method": _flags(["--tasks", "synthetic", "--method", "cmaes"], r"--method must be one of"),
    # environment
    "no-model-at-model-path": _no_model,
    "model-path-without-a-model": _empty_model,
    "model-needing-remote-code": _remote_code_model,
    "endpoint-unreachable": _unreachable,
    "endpoint-port-taken-by-another-program": _port_taken,
    "output-dir-is-a-file": _output_is_file,
    "output-dir-foreign-folder": _output_foreign,
}


def _listing(p: Path):
    if not p.exists():
        return None
    if p.is_file():
        return p.read_bytes()
    return sorted((str(q.relative_to(p)), q.stat().st_size) for q in p.rglob("*"))


class _NotVLLM(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, toy):
    """Build every row, run them (two at a time), return {row: (case, output listing before, process)}."""
    root = tmp_path_factory.mktemp("bad_inputs")
    served = root / "not-vllm"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _NotVLLM(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    model: list[Path] = []

    def model_path() -> Path:
        if not model:
            from genome_jax.model_store import default_model_path

            model.append(Path(default_model_path()))
        return model[0]

    cases = {}
    for name, build in ROWS.items():
        case = build(Ctx(root / name, toy, model_path, lambda: f"http://127.0.0.1:{server.server_address[1]}"))
        cases[name] = (case, _listing(case.out))

    def one(name: str):
        return genome(cases[name][0].argv, timeout=300)

    jobs = max(1, int(os.environ.get("GENOME_RELIABILITY_JOBS", min(2, os.cpu_count() or 1))))
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            procs = dict(zip(cases, pool.map(one, cases)))
    finally:
        server.shutdown()
    return {name: (*cases[name], procs[name]) for name in cases}


def test_the_table_covers_every_kind_of_bad_input():
    kinds = {name.split("-")[0] for name in ROWS}
    assert {"adapter", "task", "config", "flag", "weights", "rate", "population", "endpoint", "model"} <= kinds
    assert len(ROWS) >= 25


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_refused_cleanly(refusals, row):
    case, before, p = refusals[row]
    assert p.returncode == 1, describe(p)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr\n{describe(p)}"
    assert lines[0].startswith("genome: error: "), describe(p)
    assert re.search(case.culprit, lines[0]), f"{case.culprit!r} not in: {lines[0]}"
    assert "Traceback" not in p.stderr + p.stdout
    after = _listing(case.out)
    if before is None:
        assert after is None or after == [], f"{case.out} was written: {after}"
    else:
        assert after == before, f"{case.out} changed"
    if case.after is not None:
        case.after()


def test_debug_flag_shows_the_traceback(tmp_path):
    """--debug is the one way to get a traceback for a bad input."""
    p = genome(["--debug", "run", "--tasks", "synthetic", "--lora_dir", tmp_path / "missing", "--output_dir",
                tmp_path / "out"])
    # the user-facing error classes: UserError and its subclasses (ParamError names a parameter)
    assert p.returncode != 0 and "Traceback" in p.stderr, describe(p)
    assert re.search(r"genome_jax\.errors\.(UserError|ParamError): lora_dir \S+: no such folder", p.stderr), describe(p)
