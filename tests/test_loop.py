import dataclasses
import json
import os
import shutil
import signal
from typing import ClassVar

import chex
import numpy as np
import pytest

from jaxllm import checkpoint, data, loop
from jaxllm.config import PRESETS

# Tiny runs: 2 layers, 32 wide; batches [4, 17].
RUN = {"preset": "tiny", "steps": 8, "batch": 4, "seq": 16, "eval_every": 4, "eval_batches": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 24 KB text file: the start of the built-in corpus."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(data.default_corpus_files()[0].read_bytes()[:24_000])
    return str(path)


@pytest.fixture
def spy(monkeypatch):
    """Records the train steps the loop makes; ``spy.stop_at[step] = signum`` signals the process after
    that update, ``spy.poison.add(step)`` reports a NaN loss for it."""

    class Spy:
        made: ClassVar[list] = []
        stop_at: ClassVar[dict] = {}
        poison: ClassVar[set] = set()

    real = loop.compiled_steps  # cached per process: tests with the same settings share the steps

    def steps(*settings):
        optimizer, step, eval_step = real(*settings)
        Spy.made.append(step)

        def call(state, batch):
            state, metrics = step(state, batch)
            done = int(state.step)
            if done in Spy.poison:
                metrics = {**metrics, "loss": metrics["loss"] * np.nan}
            if done in Spy.stop_at:
                os.kill(os.getpid(), Spy.stop_at[done])
            return state, metrics

        return optimizer, call, eval_step

    monkeypatch.setattr(loop, "compiled_steps", steps)
    return Spy


def _fake_checkpoint(run_dir, corpus):
    """A checkpoint at step 4 with the metadata of a RUN (its arrays are not a model's: nothing reads
    them before the checks under test)."""
    settings = loop.TrainSettings(**{k: v for k, v in RUN.items() if k != "preset"}, data=corpus)
    meta = {
        "step": 4,
        "train": dataclasses.asdict(settings),
        "data": loop.prepare_data(settings, None).info,
    }
    config = PRESETS["tiny"]
    checkpoint.save(checkpoint.manager(run_dir), 4, {"w": np.zeros(2)}, None, config, meta)


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_resume_is_bit_exact_and_compiles_once(tmp_path, corpus, spy, capsys):
    straight = loop.train(tmp_path / "a", data=corpus, **RUN)
    assert straight["step"] == 8 and straight["stopped_by"] is None
    spy.stop_at[4] = signal.SIGTERM
    stopped = loop.train(tmp_path / "b", data=corpus, ckpt_every=100, **RUN)
    assert stopped["step"] == 4 and stopped["stopped_by"] == "SIGTERM"
    assert checkpoint.latest_step(tmp_path / "b") == 4
    resumed = loop.train(tmp_path / "b", resume=True, data=corpus)
    assert resumed["step"] == 8
    _, params_a = checkpoint.load_params(tmp_path / "a")
    _, params_b = checkpoint.load_params(tmp_path / "b")
    chex.assert_trees_all_equal(params_a, params_b)
    losses = [(r["step"], r["loss"]) for r in _train_records(tmp_path / "a")]
    assert [(r["step"], r["loss"]) for r in _train_records(tmp_path / "b")] == losses
    # One compiled step served the fresh, the stopped and the resumed run, and compiled once.
    assert len({id(step) for step in spy.made}) == 1 and spy.made[0]._cache_size() == 1
    assert "validation loss" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, spy):
    spy.poison.add(6)
    with pytest.raises(
        loop.DivergedError, match=r"step 6: loss nan.*last good checkpoint is step 4"
    ):
        loop.train(tmp_path, data=corpus, ckpt_every=4, **RUN)
    assert checkpoint.latest_step(tmp_path) == 4
    config, _ = checkpoint.load_params(tmp_path)
    assert config.d_model == 32


def test_interrupted_saves_are_never_loaded(tmp_path, corpus):
    loop.train(tmp_path, data=corpus, ckpt_every=4, **RUN)
    assert checkpoint.complete_steps(tmp_path) == [4, 8]
    _, params8 = checkpoint.load_params(tmp_path)
    # A save cut short before orbax renamed its temporary directory into place.
    shutil.copytree(tmp_path / "8", tmp_path / "16.orbax-checkpoint-tmp-1234")
    assert checkpoint.latest_step(tmp_path) == 8
    chex.assert_trees_all_equal(checkpoint.load_params(tmp_path)[1], params8)
    with pytest.raises(checkpoint.CheckpointError, match="no complete step 16"):
        checkpoint.load_params(tmp_path, step=16)
    assert loop.train(tmp_path, resume=True)["step"] == 8  # nothing left to do


def _data_files(step_dir):
    return sorted(
        p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"
    )


DAMAGE = {
    "truncated": lambda step: [
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]) for f in _data_files(step)
    ],
    "overwritten": lambda step: [
        f.write_bytes(b"\0" * f.stat().st_size) for f in _data_files(step)
    ],
    "deleted": lambda step: [f.unlink() for f in _data_files(step)],
    "no opt_state": lambda step: shutil.rmtree(step / "opt_state"),
    "no meta": lambda step: shutil.rmtree(step / "meta"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A finished RUN with checkpoints at steps 4 and 8, and its parameters at each."""
    run_dir = tmp_path_factory.mktemp("trained")
    loop.train(run_dir, data=corpus, ckpt_every=4, **RUN)
    return run_dir, {s: checkpoint.load_params(run_dir, step=s)[1] for s in (4, 8)}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_step_falls_back_to_the_newest_that_restores(tmp_path, trained, damage):
    run_dir, params = trained
    shutil.copytree(run_dir, tmp_path / "run")
    DAMAGE[damage](tmp_path / "run" / "8")
    warnings = []
    _, loaded = checkpoint.load_params(tmp_path / "run", warn=warnings.append)
    chex.assert_trees_all_equal(loaded, params[4] if damage != "no opt_state" else params[8])
    if damage != "no opt_state":  # serving reads params and meta alone
        assert len(warnings) == 1 and "skipped step 8" in warnings[0]


def test_resume_past_a_damaged_step_is_exact(tmp_path, trained, capsys):
    run_dir, params = trained
    shutil.copytree(run_dir, tmp_path / "run")
    DAMAGE["truncated"](tmp_path / "run" / "8")
    assert loop.train(tmp_path / "run", resume=True)["step"] == 8
    assert "skipped step 8" in capsys.readouterr().err
    chex.assert_trees_all_equal(checkpoint.load_params(tmp_path / "run")[1], params[8])
    steps = [r["step"] for r in _train_records(tmp_path / "run")]
    assert steps == list(range(1, 9))


def test_no_step_restores_is_one_error(tmp_path, trained):
    run_dir, _ = trained
    shutil.copytree(run_dir, tmp_path / "run")
    for step in (4, 8):
        DAMAGE["deleted"](tmp_path / "run" / str(step))
    with pytest.raises(
        checkpoint.DamagedCheckpointError, match=r"no checkpoint .* loads: step 8 .*; step 4"
    ):
        checkpoint.load_params(tmp_path / "run")
    with pytest.raises(checkpoint.DamagedCheckpointError):
        loop.train(tmp_path / "run", resume=True)


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"batch": 0}, "batch must be a positive integer, got 0"),
        ({"seq": -1}, "seq must be a positive integer"),
        ({"seq": 65}, "seq 65 exceeds the model's context max_len=64"),
        ({"steps": 8, "warmup": 8}, "warmup"),
        ({"batch": 6, "accum": 4}, "not divisible"),
        ({"data": "/nonexistent/corpus"}, "does not exist"),
        ({"data": "EMPTY"}, "no text"),
        ({"data": "SHORT"}, "fewer than seq_len"),
    ],
)
def test_bad_input_fails_before_anything_is_traced(tmp_path, corpus, monkeypatch, changes, word):
    monkeypatch.setattr(loop, "Run", lambda *a: pytest.fail("traced before checking input"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("x" * 20)
    files = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}
    settings = {**RUN, "data": corpus, **changes}
    settings["data"] = files.get(settings["data"], settings["data"])
    with pytest.raises(ValueError, match=word):
        loop.train(tmp_path / "run", **settings)


def test_resume_refuses_missing_or_different_runs(tmp_path, corpus, monkeypatch):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
        loop.train(tmp_path / "none", resume=True)
    monkeypatch.setattr(loop, "Run", lambda *a: pytest.fail("traced before checking input"))
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, corpus)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        loop.train(run_dir, data=corpus, **RUN)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"different config: n_layers=2 \(requested 3\)"
    ):
        loop.train(run_dir, resume=True, overrides=["n_layers=3"])
    with pytest.raises(checkpoint.CheckpointError, match=r"trained with batch=4 \(requested 8\)"):
        loop.train(run_dir, resume=True, batch=8)
    other = tmp_path / "other.txt"
    other.write_text("y" * 5000)
    with pytest.raises(data.DataError, match="differs from the data the checkpoint"):
        loop.train(run_dir, resume=True, data=str(other))
