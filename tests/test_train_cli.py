import errno
import importlib.util
import json
import signal
import subprocess
import sys
import time

import chex
import pytest

from jaxllm import checkpoint, data, loop, runlock
from jaxllm.cli import main

TINY = ["--preset", "tiny", "--batch", "4", "--seq", "16"]


def test_train_command_writes_a_run_that_serving_can_load(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--steps", "8", "--data", corpus, "--out", str(out)]
    argv += ["--eval-every", "4", "--eval-batches", "1"]  # test_loop's: shared compiled steps
    # The `tensorboard` extra is optional (a GPU image may lack it); test_progress reads the events.
    board = importlib.util.find_spec("tensorboardX") is not None
    assert main(argv + (["--tensorboard", str(tmp_path / "tb")] if board else [])) == 0
    if board:
        [events] = (tmp_path / "tb").glob("events.out.tfevents.*")
        assert b"train/loss" in events.read_bytes() and b"val/loss" in events.read_bytes()
    printed = capsys.readouterr()
    assert "byte-unigram entropy" in printed.out and "validation loss" in printed.out
    assert "validation loss" in printed.err  # progress lines
    summary = json.loads((out / loop.SUMMARY_FILE).read_text())
    assert summary["step"] == 8 and summary["stopped_by"] is None
    assert summary["unigram_entropy"] == pytest.approx(
        data.unigram_entropy(data.load_corpus(corpus))
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 4, 8]
    config, params = checkpoint.load_params(out)
    assert config.d_model == 32 and params["embed"]["embedding"].shape == (257, 32)
    # The same directory again without --resume would overwrite it: refused.
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--batch", "0"], "batch must be a positive integer"),
        (["--seq", "100"], "exceeds the model's context max_len=64"),
        (["--data", "/nonexistent/corpus"], "does not exist"),
        (["--resume"], "no checkpoint directory"),
        (["--steps", "ten"], "invalid int value"),
        (["--steps", "21474836480"], "steps must be a positive integer <= 2147483647"),
        (["--seed", str(2**64)], "expected a seed in [0, 4294967295]"),
        (["--lr", "inf"], "learning rate must be a positive finite number"),
        (["--weight-decay", "nan"], "weight_decay must be a finite number"),
        (["--out", ""], "expected a directory, got an empty path"),
        (["--tensorboard", "FILE"], "cannot be a directory: it is a file"),
        (["--out", "FILE/run"], "cannot be a directory: "),
    ],
)
def test_bad_train_input_is_one_line(tmp_path, extra, word, capsys):
    (tmp_path / "file").write_text("")
    extra = [a.replace("FILE", str(tmp_path / "file")) for a in extra]
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow  # a second Python process importing JAX and compiling: ~10-30 s on 2 shared cores
def test_sigterm_saves_and_the_run_resumes_exactly(tmp_path, corpus):
    """The in-process signal path runs in make test (test_loop); this one kills a real process."""
    out, steps = tmp_path / "run", 400
    argv = [*TINY, "--steps", str(steps), "--data", corpus, "--eval-every", "1000"]
    with (tmp_path / "stderr.txt").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxllm", "train", *argv, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and (
            not metrics.is_file() or metrics.read_text().count('"train"') < 5
        ):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (tmp_path / "stderr.txt").read_text()
    assert "stopped by SIGTERM" in stdout
    stopped = checkpoint.latest_step(out)
    assert 5 <= stopped < steps
    assert json.loads((out / loop.SUMMARY_FILE).read_text())["step"] == stopped

    assert loop.train(out, resume=True)["step"] == steps
    loop.train(
        tmp_path / "straight",
        preset="tiny",
        batch=4,
        seq=16,
        steps=steps,
        eval_every=1000,
        data=corpus,
    )
    chex.assert_trees_all_equal(
        checkpoint.load_params(out)[1], checkpoint.load_params(tmp_path / "straight")[1]
    )


def _one_line(capsys, *words):
    """The error is one line, after any progress lines, with no traceback."""
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert err.count("jaxllm: ") == 1 and last.startswith("jaxllm: ") and "Traceback" not in err
    for word in words:
        assert word in last, err


def test_failures_of_the_run_itself_exit_1_with_one_line(tmp_path, corpus, monkeypatch, capsys):
    argv = ["train", *TINY, "--steps", "8", "--data", corpus, "--eval-every", "4"]
    argv += ["--eval-batches", "1", "--ckpt-every", "4"]

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full_disk)
    assert main([*argv, "--out", str(tmp_path / "full")]) == 1
    _one_line(capsys, "No space left on device")
    monkeypatch.undo()
    (tmp_path / "busy").mkdir()
    with runlock.hold(tmp_path / "busy"):
        assert main([*argv, "--out", str(tmp_path / "busy")]) == 2
    _one_line(capsys, "in use by another process")


@pytest.mark.parametrize(
    ("raised", "status", "word"),
    [
        (KeyboardInterrupt(), 128 + signal.SIGINT, "interrupted"),
        (loop.DivergedError("step 3: loss nan"), 1, "loss nan"),
        (checkpoint.DamagedCheckpointError("no checkpoint loads"), 1, "no checkpoint loads"),
    ],
)
def test_exit_status_by_kind_of_ending(tmp_path, monkeypatch, capsys, raised, status, word):
    def ends(*_, **__):
        raise raised

    monkeypatch.setattr(loop, "train", ends)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == status
    _one_line(capsys, word)
