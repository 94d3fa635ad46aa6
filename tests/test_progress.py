import io
import json

import pytest

from jaxllm import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


METRICS = {"loss": 2.5, "grad_norm": 0.5, "lr": 1e-3}


def test_format_seconds():
    assert progress.format_seconds(3.4) == "3s"
    assert progress.format_seconds(123) == "2m03s"
    assert progress.format_seconds(3723) == "1h02m03s"
    assert progress.format_seconds(float("nan")) == "?"


def test_log_lines_off_a_terminal_and_metrics_file(tmp_path):
    stream = io.StringIO()
    reporter = progress.Reporter(tmp_path, 4, 100, stream, log_every=2)
    for step, seconds in enumerate([5.0, 0.5, 0.25, 0.25], start=1):  # the first one compiles
        reporter.train(step, METRICS, seconds)
    reporter.val(4, 2.0)
    reporter.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["2/4", "4/4", "4/4"]
    assert "300 tok/s" in lines[1]  # 3 timed steps, 300 tokens in 1 s; the compiling step left out
    assert "validation loss 2.0000" in lines[2] and "\r" not in stream.getvalue()
    records = [json.loads(r) for r in (tmp_path / progress.METRICS_FILE).read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", s) for s in range(1, 5)] + [
        ("val", 4)
    ]
    assert records[1]["tokens_per_s"] == pytest.approx(200)
    assert reporter.tokens_per_s() == pytest.approx(300)


def test_bar_on_a_terminal(tmp_path):
    stream = Terminal()
    reporter = progress.Reporter(tmp_path, 10, 100, stream, log_every=100)
    reporter.train(1, METRICS, 3.0)
    reporter.train(5, METRICS, 1.0)
    reporter.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 2 and "5/10 [############------------]" in text
    assert "ETA 5s" in text and "100 tok/s" in text


def test_truncate_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / progress.METRICS_FILE
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 7)))
    progress.truncate_metrics(tmp_path, 4)
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2, 3, 4]
