import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from typing import ClassVar

import chex
import jax
import numpy as np
import pytest

from jaxllm import analytic, checkpoint, data, loop, memory, progress, runlock, train
from jaxllm.config import PRESETS

# Tiny runs: 2 layers, 32 wide; batches [4, 17].
RUN = {"preset": "tiny", "steps": 8, "batch": 4, "seq": 16, "eval_every": 4, "eval_batches": 1}


@pytest.fixture
def spy(monkeypatch):
    """Records the train steps the loop makes; ``spy.stop_at[step] = signum`` signals the process after
    that update, ``spy.poison.add(step)`` reports a NaN loss for it, ``spy.nan_params.add(step)`` makes
    its update leave NaN parameters (with the finite loss computed before it)."""

    class Spy:
        made: ClassVar[list] = []
        stop_at: ClassVar[dict] = {}
        poison: ClassVar[set] = set()
        nan_params: ClassVar[set] = set()

    real = loop.compiled_steps  # cached per process: tests with the same settings share the steps

    def steps(*settings):
        optimizer, step, eval_step = real(*settings)
        Spy.made.append(step)

        def call(state, batch):
            state, metrics = step(state, batch)
            done = int(state.step)
            if done in Spy.poison:
                metrics = {**metrics, "loss": metrics["loss"] * np.nan}
            if done in Spy.nan_params:
                state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
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
    resumed = loop.train(tmp_path / "b", resume=True, data=corpus, **RUN)  # the same command
    assert resumed["step"] == 8
    config_a, params_a = checkpoint.load_params(tmp_path / "a")
    assert config_a == train.training_config(PRESETS["tiny"])  # unrolled on a CPU or GPU
    _, params_b = checkpoint.load_params(tmp_path / "b")
    chex.assert_trees_all_equal(params_a, params_b)
    losses = [(r["step"], r["loss"]) for r in _train_records(tmp_path / "a")]
    assert [(r["step"], r["loss"]) for r in _train_records(tmp_path / "b")] == losses
    # One compiled step served the fresh, the stopped and the resumed run, and compiled once.
    assert len({id(step) for step in spy.made}) == 1 and spy.made[0]._cache_size() == 1
    assert "validation loss" in capsys.readouterr().err


def test_a_fresh_run_trains_its_backends_config_unless_told(tmp_path, corpus):
    settings = {k: v for k, v in RUN.items() if k != "preset"} | {"data": corpus}
    plan = loop.resolve(tmp_path / "a", False, loop.ModelRequest("tiny"), settings)
    assert plan.config == train.training_config(PRESETS["tiny"])
    if jax.default_backend() in ("cpu", "gpu"):
        assert plan.config.scan_unroll == 2  # layers unrolled
    told = loop.ModelRequest("tiny", overrides=("scan_unroll=1",))
    assert loop.resolve(tmp_path / "b", False, told, settings).config == PRESETS["tiny"]


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
    "invalid config": lambda step: _edit_config(step, n_layers=0),
}


def _edit_config(step_dir, **fields):
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"] |= fields
    meta_file.write_text(json.dumps(meta))


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


@pytest.mark.parametrize("damage", ["truncated", "invalid config"])
def test_resume_past_a_damaged_step_is_exact(tmp_path, trained, capsys, damage):
    run_dir, params = trained
    shutil.copytree(run_dir, tmp_path / "run")
    DAMAGE[damage](tmp_path / "run" / "8")
    assert loop.train(tmp_path / "run", resume=True, keep=1)["step"] == 8
    assert "skipped step 8" in capsys.readouterr().err
    assert (tmp_path / "run" / "8.damaged").is_dir()  # kept for inspection, out of orbax's sight
    assert checkpoint.complete_steps(tmp_path / "run") == [8]  # keep=1 kept the new, good step
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
        ({"steps": 2**31}, r"steps must be a positive integer <= 2147483647, got 2147483648"),
        ({"batch": 6, "accum": 4}, "not divisible"),
        ({"data": "/nonexistent/corpus"}, "does not exist"),
        ({"data": "EMPTY"}, "no text"),
        ({"data": "SHORT"}, "fewer than seq_len"),
        ({"lr": math.inf}, "learning rate must be a positive finite number, got inf"),
        ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0, got nan"),
        ({"clip_norm": math.inf}, "clip_norm must be a positive finite number"),
        ({"val_fraction": math.nan}, "val_fraction"),
        ({"seed": 2**32}, r"seed must be an integer in \[0, 4294967295\], got 4294967296"),
        ({"batch": 2_000_000}, r"training needs about .* GiB .*--batch 2000000"),
        ({"eval_batches": 10_000_000}, r"validation set .* GiB at --eval-batches 10000000"),
    ],
)
def test_bad_input_fails_before_anything_is_traced(tmp_path, corpus, monkeypatch, changes, word):
    monkeypatch.setattr(loop, "Run", lambda *a: pytest.fail("traced before checking input"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("x" * 20)
    files = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}
    settings = {**RUN, "data": corpus, **changes}
    settings["data"] = files.get(settings["data"], settings["data"])
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)  # 1 GiB, whatever this host has
    with pytest.raises(ValueError, match=word):
        loop.train(tmp_path / "run", **settings)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_the_memory_estimate_is_the_analytic_train_step_plus_the_validation_set():
    settings = loop.TrainSettings(batch=8, seq=16, accum=2, eval_batches=3)
    need = loop.memory_needed(PRESETS["tiny"], settings)
    step = analytic.train_memory(PRESETS["tiny"], 4, 16)["total"]  # one micro-batch of B / accum
    assert need == {"train_step": step, "validation_set": 2 * 3 * 8 * 17 * 4, "total": step + 3264}


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


def test_disk_full_mid_record_leaves_a_torn_tail_that_resume_drops(tmp_path, corpus, monkeypatch):
    """A full disk cuts the record of step 6 short; the run fails and resumes from step 4 exactly."""
    loop.train(tmp_path / "straight", data=corpus, ckpt_every=4, **RUN)
    real = progress.Reporter._append

    def full_disk(self, record):
        if record.get("step") == 6 and record["kind"] == "train":
            self.metrics.write(json.dumps(record)[:40])
            self.metrics.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record)

    monkeypatch.setattr(progress.Reporter, "_append", full_disk)
    with pytest.raises(OSError, match="No space left"):
        loop.train(tmp_path / "run", data=corpus, ckpt_every=4, **RUN)
    monkeypatch.setattr(progress.Reporter, "_append", real)
    assert checkpoint.latest_step(tmp_path / "run") == 4
    assert not (tmp_path / "run" / "metrics.jsonl").read_text().endswith("\n")
    log = io.StringIO()
    resumed = loop.train(tmp_path / "run", resume=True, stream=log)
    assert resumed["step"] == 8 and "warning: " in log.getvalue()
    assert "metrics.jsonl: dropped a torn last line (line 8" in log.getvalue()
    assert [r["step"] for r in _train_records(tmp_path / "run")] == list(range(1, 9))
    chex.assert_trees_all_equal(
        checkpoint.load_params(tmp_path / "run")[1],
        checkpoint.load_params(tmp_path / "straight")[1],
    )


def test_a_damaged_metrics_line_before_the_last_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "val", "step": 0}\n{"kind": "tr\n{"step": 1}\n'
    )
    with pytest.raises(
        progress.MetricsError, match=r"metrics.jsonl line 2 is not a metrics record"
    ):
        progress.truncate_metrics(tmp_path, 4)


def test_non_finite_parameters_are_never_saved(tmp_path, corpus, spy):
    spy.nan_params.add(8)  # the update of step 8 leaves NaN weights; its loss (before it) is finite
    with pytest.raises(
        loop.DivergedError, match=r"after step 8 holds .* NaN.*last good checkpoint is step 4"
    ):
        loop.train(tmp_path, data=corpus, ckpt_every=4, **RUN)
    assert checkpoint.complete_steps(tmp_path) == [4]


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with runlock.hold(run_dir), pytest.raises(runlock.RunDirInUseError, match="in use"):
        loop.train(run_dir, data=corpus, **RUN)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, time; fd = os.open({str(run_dir)!r}, os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == b"\n"  # it holds the lock
    fd = os.open(run_dir, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert loop.train(run_dir, data=corpus, **RUN)["step"] == RUN["steps"]


def test_out_inside_data_is_refused_before_anything_is_made(tmp_path, corpus):
    shutil.copy(corpus, tmp_path / "corpus.txt")
    with pytest.raises(ValueError, match=r"--out .* is inside --data"):
        loop.train(tmp_path / "runs" / "a", data=str(tmp_path), **RUN)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="must not be empty"):
        loop.train("", data=corpus, **RUN)


def test_a_fresh_run_does_not_reuse_an_earlier_attempts_records(tmp_path, corpus, spy):
    other = tmp_path / "other.txt"
    other.write_bytes(data.default_corpus_files()[1].read_bytes()[:24_000])
    spy.poison.add(2)
    with pytest.raises(loop.DivergedError):
        loop.train(tmp_path / "run", data=str(other), ckpt_every=100, **RUN)
    spy.poison.clear()
    fresh = loop.train(tmp_path / "run", data=corpus, **RUN)
    clean = loop.train(tmp_path / "clean", data=corpus, **RUN)
    assert fresh["first_val_loss"] == clean["first_val_loss"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"step": 0,') == 1
