"""Checkpoints through real orbax: round trip, retention, config refusal, damaged-step fallback, temp cleanup."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genome_jax import checkpoint, synthetic
from genome_jax.errors import UserError
from genome_jax.strategies import make_strategy

EXPERTS = synthetic.synthetic_experts(0, n_experts=4, n_layers=1, d_model=16, rank=4)
STRATEGY, PARAMS = make_strategy("genome_plus", population_size=4, max_population_size=6)
CONFIG = {"seed": 0, **STRATEGY.record(PARAMS)}


def _state(gen: int):
    """A real GENOME+ state whose arrays depend on gen."""
    pop = jax.tree_util.tree_map(lambda a: a * (1.0 + gen), EXPERTS)
    fit = jnp.asarray([-1.0, -0.5, -0.25, -2.0]) + gen
    s = STRATEGY.init(jax.random.PRNGKey(gen), pop, fit, PARAMS)
    return s.replace(generation=jnp.asarray(gen, jnp.int32))


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _save_steps(d, steps, **kw):
    with checkpoint.RunCheckpointer(d, CONFIG, **kw) as ck:
        for g in steps:
            ck.save(g, _state(g))


def test_round_trip_is_bit_identical_and_keeps_the_last_few(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, range(5), keep=3)
    with checkpoint.RunCheckpointer(d, CONFIG, keep=3) as ck:
        assert ck.steps == [2, 3, 4]
        r = ck.restore_latest(_state(0))
    assert r.step == 4 and r.skipped == ()
    _assert_same(r.state, _state(4))
    assert type(r.state) is type(_state(0))
    assert json.loads((d / checkpoint.CONFIG_NAME).read_text()) == {**json.loads(json.dumps(CONFIG)),
                                                                      "state_format": checkpoint.STATE_FORMAT}
    assert not [p for p in os.listdir(d) if "tmp" in p]


def test_fresh_directory_restores_nothing(tmp_path):
    with checkpoint.RunCheckpointer(tmp_path / "new", CONFIG) as ck:
        assert ck.restore_latest(_state(0)) is None
    assert checkpoint.restore_latest(tmp_path / "missing", _state(0)) is None


def test_a_different_config_is_refused_naming_the_keys(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, [0])
    other = {**CONFIG, "seed": 1, "params": {**CONFIG["params"], "sigma": 0.5}}
    with pytest.raises(UserError) as e:
        checkpoint.RunCheckpointer(d, other)
    msg = str(e.value)
    assert "params.sigma: 0.01 -> 0.5" in msg and "seed: 0 -> 1" in msg and "population_size" not in msg
    assert "\n" not in msg
    # the same config still opens and the saved config is untouched
    with checkpoint.RunCheckpointer(d, CONFIG) as ck:
        assert ck.latest_step() == 0
    assert json.loads((d / checkpoint.CONFIG_NAME).read_text())["seed"] == 0


def test_checkpoints_without_config_are_refused(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, [0])
    (d / checkpoint.CONFIG_NAME).unlink()
    with pytest.raises(UserError, match="no run_config.json"):
        checkpoint.RunCheckpointer(d, CONFIG)


def test_checkpoints_of_another_state_format_are_refused_in_one_line(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, [0])
    path = d / checkpoint.CONFIG_NAME
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "state_format"}))
    with pytest.raises(UserError) as e:
        checkpoint.RunCheckpointer(d, CONFIG)
    assert "state format 1" in str(e.value) and f"format {checkpoint.STATE_FORMAT}" in str(e.value)
    assert "\n" not in str(e.value)


def test_config_differences_flattens_nested_keys():
    assert checkpoint.config_differences({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"b": 2, "c": [1]}}) == [
        "a.b: 1 -> 2", "d: 2 -> '<absent>'"]


def _data_files(step_dir: Path):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, list((step_dir / "state").rglob("*"))
    return sorted(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path):
    f = _data_files(step_dir)[-1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bytes(step_dir: Path):
    # same size, different content: only the checksums can tell
    for f in _data_files(step_dir):
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))


def _drop_meta(step_dir: Path):
    for p in (step_dir / "meta").iterdir():
        p.unlink()


def _wrong_checksum(step_dir: Path):
    # arrays that read back fine but are not what was saved: caught by the recorded crc32s
    f = step_dir / "meta" / "metadata"
    meta = json.loads(f.read_text())
    key = sorted(meta["checksums"])[0]
    meta["checksums"][key] ^= 1
    f.write_text(json.dumps(meta))


# orbax leaves callbacks of the aborted reads behind (harmless "Event loop is closed" when they fire late)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _drop_meta, _wrong_checksum],
                         ids=["truncated", "flipped", "no-meta", "checksum"])
def test_damaged_latest_falls_back_to_the_previous_step(tmp_path, caplog, damage):
    d = tmp_path / "ck"
    _save_steps(d, range(3))
    damage(d / "2")
    # read-only restore: falls back, warns, deletes nothing
    with caplog.at_level(logging.WARNING, logger="genome_jax.checkpoint"):
        r = checkpoint.restore_latest(d, _state(0))
    assert r.step == 1 and r.skipped == (2,)
    _assert_same(r.state, _state(1))
    assert any("step 2" in m and "falling back" in m for m in caplog.messages), caplog.messages
    assert (d / "2").exists()
    # the writer removes the bad step so the resumed run can save generation 2 again
    with checkpoint.RunCheckpointer(d, CONFIG) as ck:
        r = ck.restore_latest(_state(0))
        assert r.step == 1 and ck.steps == [0, 1]
        ck.save(2, _state(2))
    r = checkpoint.restore_latest(d, _state(0))
    assert r.step == 2 and r.skipped == ()
    _assert_same(r.state, _state(2))


def test_every_step_damaged_is_an_error(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, range(2))
    _drop_meta(d / "0")
    _drop_meta(d / "1")
    with pytest.raises(UserError, match="no readable checkpoint"):
        checkpoint.restore_latest(d, _state(0))


def test_temporary_leftovers_are_cleaned_on_open(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, [0])
    (d / "1.orbax-checkpoint-tmp").mkdir()
    (d / "1.orbax-checkpoint-tmp" / "junk").write_text("x")
    (d / f".{checkpoint.CONFIG_NAME}.tmp123").write_text("{")
    with checkpoint.RunCheckpointer(d, CONFIG) as ck:
        assert ck.steps == [0]
    assert sorted(os.listdir(d)) == ["0", checkpoint.CONFIG_NAME]


def test_keep_must_leave_a_fallback(tmp_path):
    with pytest.raises(UserError, match="keep"):
        checkpoint.RunCheckpointer(tmp_path / "ck", CONFIG, keep=1)
