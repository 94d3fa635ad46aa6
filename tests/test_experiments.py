"""Smoke test: every experiment runs at --quick scale and writes data that parses, plots and a summary."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # the `plot` extra; absent from some GPU images

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("roofline", "decode_batch", "memory", "seqlen", "estimates", "padding")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"experiment_{name}", ROOT / "experiments" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_quick_writes_data_plot_and_summary(name, tmp_path):
    out = tmp_path / name
    assert load(name).main(["--quick", "--out", str(out)]) == 0
    tables = list(out.glob("*.csv"))
    assert tables, f"{name} wrote no CSV"
    for table in tables:
        with table.open() as f:
            rows = list(csv.DictReader(f))
        assert rows, f"{table} has no rows"
        values = [v for row in rows for v in row.values()]
        assert not {"nan", "None", "inf"} & set(values), f"{table} holds a non-number"
    for blob in out.glob("*.json"):
        json.loads(blob.read_text())
    plots = list(out.glob("*.png"))
    assert plots and all(p.read_bytes()[:8] == PNG_MAGIC for p in plots)
    summary = (out / "summary.md").read_text()
    for plot in plots:
        assert f"({plot.name})" in summary, f"summary.md does not show {plot.name}"


def test_report_gathers_summaries(tmp_path):
    results = tmp_path / "results"
    load("memory").main(["--quick", "--out", str(results / "memory")])
    out = tmp_path / "report"
    assert (
        load("report").main(
            ["--results", str(results), "--run", str(tmp_path / "run"), "--out", str(out)]
        )
        == 0
    )
    report = (out / "REPORT.md").read_text()
    assert "Calibrated peaks" in report and "(memory/memory.png)" in report
    assert (out / "memory" / "memory.png").is_file()
    assert "Missing: " in report  # the experiments not run are named, not silently dropped
