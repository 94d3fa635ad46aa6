"""Smoke test: every experiment runs at --quick scale and writes data that parses, plots and a summary."""

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace as Namespace

import jax
import pytest

from jaxllm.experiment import EXPERIMENTS

pytest.importorskip("matplotlib")  # the `plot` extra; absent from some GPU images

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"experiment_{name}", ROOT / "experiments" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
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


def test_report_gathers_summaries(tmp_path, monkeypatch):
    from jaxllm import hardware

    quick = hardware.calibrate(quick=True)  # the report's full calibration takes seconds
    monkeypatch.setattr(hardware, "calibrate", lambda **_: quick)
    results = tmp_path / "results"
    (results / "memory").mkdir(parents=True)  # an experiment's output: a summary and its plot
    (results / "memory" / "summary.md").write_text("# Memory\n\n![memory](memory.png)\n")
    (results / "memory" / "memory.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "report"
    assert (
        load("report").main(
            ["--results", str(results), "--run", str(tmp_path / "run"), "--out", str(out)]
        )
        == 0
    )
    report = (out / "REPORT.md").read_text()
    assert "Calibrated peaks" in report and "## Memory" in report
    assert "(memory/memory.png)" in report
    assert (out / "memory" / "memory.png").is_file()
    assert "Missing: " in report  # the experiments not run are named, not silently dropped


# One fast check per experiment, on a value it computes (the runs above are `make test-all`).


def test_roofline_shapes_cover_every_phase_within_the_context():
    shapes = load("roofline").shapes(quick=False, max_len=128)
    assert {phase for phase, _, _ in shapes} == {"train", "prefill", "decode"}
    assert max(seq for _, _, seq in shapes) == 128


def test_roofline_names_points_above_their_roof_and_a_second_calibration():
    """A point measured faster than its roof is listed (the calibration is suspect); the summary says
    when a first calibration put points above the roof and was taken again."""
    mod = load("roofline")

    def point(phase, seq, efficiency):
        xla = Namespace(
            efficiency=efficiency, intensity=2.0, bound="memory", predicted_seconds=1e-3, ridge=3.0
        )
        return Namespace(phase=phase, batch=1, seq=seq, seconds=1e-3, roofline=Namespace(xla=xla))

    results = [point("prefill", 256, 1.15), point("decode", 64, 0.4)]
    assert mod.above_roof(results) == ["prefill B=1 T/S=256 115%"]
    cal = {"bf16_flops_per_s": 1e11, "f32_flops_per_s": 1e11, "read_bytes_per_s": 3e10}
    cal["copy_bytes_per_s"] = 4e10
    text = "\n".join(mod.summary(results, cal, "small", "float32", ["train B=8 T/S=256 106%"]))
    assert "A first calibration put 1 points above their roof (train B=8 T/S=256 106%)" in text
    assert "**Above the roof, so the calibration is suspect:** prefill B=1 T/S=256 115%." in text
    clean = "\n".join(mod.summary(results[1:], cal, "small", "float32", []))
    assert "above their roof" not in clean and "suspect" not in clean


def test_decode_batch_knees_on_a_made_up_roofline():
    """t(B) = max(1 ms, B * 0.1 ms) meets at B = 10; intensity 2B against a ridge of 12 crosses at 6."""
    module = load("decode_batch")
    batches = [1, 2, 4, 8, 16, 32]
    seconds = [max(1e-3, b * 1e-4) for b in batches]
    intensity = [2.0 * b for b in batches]
    assert module.measured_knee(batches, seconds) == pytest.approx(10.0)
    assert module.predicted_knee(batches, intensity, 12.0) == pytest.approx(6.0)
    assert module.predicted_knee(batches[:2], intensity[:2], 12.0) is None  # never reaches it


def test_decode_batch_saturation_is_the_limit_not_the_last_point():
    """FLOPs 100·B against bytes 1000 + 20·B: intensity 100B / (1000 + 20B) tends to 5, whatever
    the sweep's last point shows (B=8: 0.69)."""
    module = load("decode_batch")

    def point(b):
        analytic = Namespace(flops=100.0 * b, bytes=1000.0 + 20.0 * b)
        return Namespace(roofline=Namespace(analytic=analytic))

    assert module.saturation([point(b) for b in (1, 2, 4, 8)]) == pytest.approx(5.0)


def test_memory_kv_rows_follow_the_cache_formula():
    from jaxllm.config import get_preset

    cfg = get_preset("small")
    rows = load("memory").kv_rows(["small"])
    row = next(r for r in rows if r["batch"] == 8 and r["seq"] == 128)
    bytes_per = 4 if cfg.compute_dtype == "float32" else 2
    expected = 2 * bytes_per * 8 * 128 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    assert row["kv_bytes"] == expected


def test_seqlen_slope_reads_quadratic_and_linear_growth():
    module = load("seqlen")
    seqs = [64, 128, 256]
    assert module.slope(seqs, [t * t for t in seqs]) == pytest.approx(2.0)
    assert module.slope(seqs, [3 * t for t in seqs]) == pytest.approx(1.0)


def test_estimates_reasons_name_the_gaps_the_row_shows():
    row = {
        "dispatch_share": 0.2,
        "raw_over_corrected_flops": 0.5,
        "xla_over_analytic_bytes": 3.0,
        "predicted_over_measured": 0.5,
        "roofline_xla_bound": "memory",
        "roofline_xla_mfu": 0.01,
        "roofline_xla_mbu": 0.3,
        "xla_loops": [4],
    }
    reasons = load("estimates").reasons
    text = reasons(row)
    assert "dispatch is 20%" in text and "raw FLOPs are 50%" in text and "3.0x" in text
    assert "30% of the read bandwidth" in text and "loop bodies once" in text
    assert "library calls" in reasons(row | {"xla_loops": []})  # a GPU's own count, no loop


def test_padding_buckets_are_powers_of_two():
    module = load("padding")
    assert module.groups([3, 4, 5, 9, 16, 17]) == {4: 2, 8: 1, 16: 2, 32: 1}


def test_serving_cost_model_predicts_a_longer_step_for_a_longer_chunk():
    from jaxllm.config import PRESETS
    from jaxllm.engine import Engine
    from jaxllm.hardware import Peaks
    from jaxllm.model import init_params

    module = load("serving")
    cfg = PRESETS["tiny"].replace(scan_layers=False)
    params = init_params(cfg, jax.random.key(0))
    peaks = Peaks(flops_per_s=1e11, bandwidth_bytes_per_s=1e10, matmul="f32", source="test")
    predicted = [
        module.chunk_prediction(Engine(cfg, params, slots=4, policy="chunked", chunk=c), peaks)
        for c in (8, 64)
    ]
    assert 0 < predicted[0] < predicted[1]
    size = module.scale(False, 256)
    assert size["prompts"][1] + size["outputs"][1] <= 256


def test_mesh_projection_covers_both_clusters_and_its_bound_follows_the_terms():
    from jaxllm.mesh import parse_mesh

    rows = load("mesh").projection_rows()
    assert {r["devices"] for r in rows} == {8, 64}
    for r in rows:
        sizes = parse_mesh(r["mesh"])
        assert (
            sizes["data"] * sizes["fsdp"] * sizes["tensor"] == r["devices"] and sizes["tensor"] <= 8
        )
        busy = max(r["compute_s"], r["memory_s"])
        assert (r["bound"] == "communication") == (r["communication_s"] > busy), r["mesh"]
        assert r["fits"] == (r["memory_bytes"] <= r["capacity_bytes"])


def test_peers_round_idles_after_each_peer_process(monkeypatch):
    peers = load("peers")
    events = []
    monkeypatch.setattr(peers.time, "sleep", lambda s: events.append(("idle", s)))

    def cell():
        events.append("jaxllm")
        return 1.0

    def run(name):
        return lambda: events.append(name) or {"c": 2.0}

    with_llama = peers.Group([("c", cell)], run("torch"), run("llama"))
    assert peers._round(with_llama, {"c": cell}) == ({"c": 1.0}, {"c": 2.0}, {"c": 2.0}, {"c": 1.0})
    idle = ("idle", peers.SETTLE_S)
    assert events == ["jaxllm", "torch", idle, "llama", idle, "jaxllm"]
    events.clear()
    peers._round(peers.Group([("c", cell)], run("torch"), None), {"c": cell})
    assert events == ["jaxllm", "torch", idle, "jaxllm"]


def test_peers_only_that_names_no_cell_is_refused(monkeypatch, tmp_path, capsys):
    peers = load("peers")
    monkeypatch.setattr(peers.launch, "preloaded", lambda argv: None)  # no re-exec under tcmalloc
    with pytest.raises(SystemExit):
        peers.main(["--only", "train bf16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--only train bf16 names no cell" in err and "train bfloat16 B=4 T=256" in err
