"""Many processes (``jaxllm.distributed``): the flags are checked before anything starts, and a
data-parallel step across 2 processes on this machine equals the same step on one device.

The 2-process runs start real processes (tests/distributed_worker.py, ``python -m jaxllm train``)
that meet at a coordinator on a free port of 127.0.0.1; each wait has a timeout, so a process that
never joins fails the test instead of hanging it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import distributed_worker
import jax
import numpy as np
import pytest

from jaxllm import checkpoint, distributed, loop, train
from jaxllm.cli import main

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 400  # each process; two JAX processes compiling on 2 loaded cores took up to 150 s


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-processes", "0"], "--num-processes must be a positive integer, got 0"),
        (
            ["--num-processes", "2", "--process-id", "2"],
            "--process-id must be in [0, --num-processes=2), got 2",
        ),
        (["--process-id", "-1"], "--process-id must be an integer >= 0, got -1"),
        (["--coordinator", "localhost"], "--coordinator must be HOST:PORT"),
        (["--coordinator", "127.0.0.1:70000"], "got '127.0.0.1:70000'"),
        (["--coordinator", ":1234"], "got ':1234'"),
    ],
)
def test_bad_process_flags_are_one_line_before_anything_starts(tmp_path, flags, message, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()
    assert not jax.distributed.is_initialized()


def test_a_bad_coordinator_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv(distributed.COORDINATOR_ENV, "nohost")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS must be HOST:PORT"):
        distributed.initialize(distributed.Processes())
    assert not jax.distributed.is_initialized()


def test_without_flags_or_environment_nothing_starts(monkeypatch):
    monkeypatch.delenv(distributed.COORDINATOR_ENV, raising=False)
    assert not distributed.Processes().asked()
    distributed.initialize(distributed.Processes())
    assert not jax.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(commands: list[list[str]], cwd: Path) -> list[str]:
    """Run the commands at once; each one's stderr, after all exit 0 (killed after TIMEOUT_S)."""
    env = {**os.environ, "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen(c, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    errs = []
    try:
        for proc in procs:
            errs.append(proc.communicate(timeout=TIMEOUT_S)[1])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc, err in zip(procs, errs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return errs


@pytest.mark.slow  # two JAX processes: 130 s on the loaded 2-core VM
def test_a_step_across_two_processes_equals_one_device(tmp_path):
    address, out = f"127.0.0.1:{_free_port()}", tmp_path / "step.npz"
    _run_processes(
        [[sys.executable, str(WORKER), address, "2", str(i), str(out)] for i in range(2)], tmp_path
    )
    got = np.load(out)
    opt = distributed_worker.optimizer()
    config = distributed_worker.CONFIG
    state = train.init_state(config, opt, jax.random.key(0))
    state, metrics = train.make_train_step(config, opt)(state, distributed_worker.batch())
    assert int(got["devices"]) == 4  # data=4: 2 processes x 2 devices
    np.testing.assert_allclose(got["loss"], metrics["loss"], rtol=0, atol=1e-6)
    flat = jax.tree_util.tree_leaves_with_path(state.params)
    assert len(flat) == len(got.files) - 2
    for path, leaf in flat:
        np.testing.assert_allclose(got[jax.tree_util.keystr(path)], leaf, rtol=0, atol=1e-6)


@pytest.mark.slow  # two `jaxllm train` processes: 154 s on the loaded 2-core VM
def test_train_command_across_two_processes_equals_one_device(tmp_path, corpus):
    address, run = f"127.0.0.1:{_free_port()}", tmp_path / "run"
    flags = ["--preset", "tiny", "--batch", "4", "--seq", "16", "--steps", "2", "--warmup", "0"]
    flags += ["--eval-batches", "1", "--data", corpus, "--out", str(run), "--mesh", "data=2"]
    flags += ["--coordinator", address, "--num-processes", "2"]
    base = [sys.executable, "-m", "jaxllm", "train", *flags]
    errs = _run_processes([[*base, "--process-id", str(i)] for i in range(2)], Path.cwd())
    assert "validation loss" in errs[0] and "validation loss" not in errs[1]  # process 0 reports
    one = loop.train(
        tmp_path / "one",
        preset="tiny",
        batch=4,
        seq=16,
        steps=2,
        warmup=0,
        eval_batches=1,
        data=corpus,
    )
    summary = json.loads((run / loop.SUMMARY_FILE).read_text())
    assert summary["step"] == 2
    assert summary["last_val_loss"] == pytest.approx(one["last_val_loss"], abs=1e-6)
    # Two AdamW updates magnify the all-reduce's summation order (measured 1.2e-6 on one of
    # 8192 entries): the bound of tests/test_mesh.py, 1/300 of lr.
    chex.assert_trees_all_close(
        checkpoint.load_params(run)[1],
        checkpoint.load_params(tmp_path / "one")[1],
        atol=1e-5,
        rtol=0,
    )
