"""Published peaks by device kind, and a quick calibration cached per device."""

import json

import jax
import pytest

from jaxllm import hardware, products


@pytest.mark.parametrize(
    ("kind", "name", "tflops", "tbps"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989, 3.35),
        ("NVIDIA H200", "H200 SXM", 989, 4.8),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 312, 2.039),
        ("TPU v5 lite", "TPU v5e", 197, 0.819),
        ("TPU v5p", "TPU v5p", 459, 2.765),
        ("TPU v6 lite", "TPU v6e", 918, 1.638),
    ],
)
def test_published_peaks_by_device_kind(kind, name, tflops, tbps):
    sheet = hardware.published(kind)
    assert sheet is not None and sheet.name == name and sheet.source
    assert sheet.bf16_flops_per_s == tflops * 1e12
    assert sheet.bandwidth_bytes_per_s == pytest.approx(tbps * 1e12)


def test_unknown_device_has_no_published_peaks():
    assert hardware.published("cpu") is None


def test_quick_calibration_is_measured_cached_and_is_the_cpu_roofline(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    first = hardware.calibrate(quick=True)
    for key in ("f32_flops_per_s", "bf16_flops_per_s", "read_bytes_per_s", "copy_bytes_per_s"):
        assert first[key] > 1e8  # any device does > 0.1 GFLOP/s and > 0.1 GB/s
        assert first["spread"][key] >= 1.0  # slowest repeat over fastest
    saved = json.loads(hardware.cache_path().read_text())
    assert saved == first and saved["date"] and saved["jax"]
    assert hardware.calibrate(quick=True) == first  # read back, not re-measured
    if first["platform"] != "cpu":
        return  # an accelerator's roofline is the data sheet's (test_accelerator_roofline_...)
    assert first["tf32_flops_per_s"] is None  # no TF32, and no sheet: only a busy CPU is suspect
    assert all("timed repeats differ" in line for line in first["suspect"])
    peaks = hardware.roofline_peaks(first, "float32")
    assert peaks.flops_per_s == first["f32_flops_per_s"]
    assert peaks.bandwidth_bytes_per_s == first["read_bytes_per_s"]  # the memory roof: reads


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", json.dumps({"format": 1, "jax": jax.__version__})]
)
def test_a_damaged_cache_is_measured_afresh_with_a_warning(tmp_path, monkeypatch, capsys, content):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    hardware.cache_path().write_text(content)
    result = hardware.calibrate(quick=True)
    assert result["read_bytes_per_s"] > 0
    assert str(hardware.cache_path()) in capsys.readouterr().err
    assert json.loads(hardware.cache_path().read_text()) == result  # healed


@pytest.mark.parametrize(
    ("key", "value"),
    [("read_bytes_per_s", 0), ("bf16_flops_per_s", "fast"), ("spread", None), ("platform", 3)],
)
def test_a_cache_of_this_version_with_a_bad_figure_is_measured_afresh(
    tmp_path, monkeypatch, capsys, key, value
):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    good = hardware.calibrate(quick=True)
    hardware.cache_path().write_text(json.dumps(good | {key: value}))
    result = hardware.calibrate(quick=True)
    assert f"is damaged ({key}" in capsys.readouterr().err
    assert result["read_bytes_per_s"] > 0 and result["date"] >= good["date"]
    assert json.loads(hardware.cache_path().read_text()) == result  # healed


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(blocker / "sub"))  # a directory under a file
    assert hardware.calibrate(quick=True)["f32_flops_per_s"] > 0
    assert "could not save the calibration" in capsys.readouterr().err


H100 = {
    "device_kind": "NVIDIA H100 80GB HBM3",
    "platform": "gpu",
    "f32_flops_per_s": 5e13,
    "tf32_flops_per_s": 4e14,
    "bf16_flops_per_s": 7e14,
    "read_bytes_per_s": 3e12,
    "copy_bytes_per_s": 2.8e12,
    "date": "-",
}


def test_accelerator_roofline_uses_the_data_sheet():
    peaks = hardware.roofline_peaks({**H100, "suspect": []}, "bfloat16")
    assert peaks.flops_per_s == 989e12 and peaks.bandwidth_bytes_per_s == 3.35e12
    measured = hardware.roofline_peaks({**H100, "suspect": []}, "bfloat16", data_sheet=False)
    assert measured.flops_per_s == 7e14 and measured.bandwidth_bytes_per_s == 3e12


def test_f32_matmuls_on_a_gpu_run_at_the_tf32_peak_unless_precision_is_highest():
    with jax.default_matmul_precision("default"):
        assert hardware.matmul_key(H100, "float32") == "tf32_flops_per_s"
        assert hardware.roofline_peaks(H100, "float32").flops_per_s == 494e12
    with jax.default_matmul_precision("highest"):
        assert hardware.matmul_key(H100, "float32") == "f32_flops_per_s"


def test_calibrations_off_the_data_sheet_are_suspect():
    assert hardware.suspect(H100) == []  # 71-85% of the sheet
    low = {**H100, "bf16_flops_per_s": 114e12, "read_bytes_per_s": 4e12}  # 12%, and 119%
    lines = hardware.suspect(low)
    assert len(lines) == 2 and "bf16_flops_per_s" in lines[0] and "read_bytes_per_s" in lines[1]


@pytest.mark.parametrize(
    ("seconds", "tried", "best"),
    [
        # side 1024: 2 GFLOP/s; 2048: 8% faster -> the climb stops before 4096
        ((2 * 1024**3 / 2e9, 2 * 2048**3 / 2.16e9), [1024, 2048], 2.16e9),
        # 2048 twice as fast, 4096 slower again: the best side's rate
        ((2 * 1024**3 / 2e9, 2 * 2048**3 / 4e9, 2 * 4096**3 / 3e9), [1024, 2048, 4096], 4e9),
    ],
)
def test_the_matmul_side_climbs_while_the_rate_rises(monkeypatch, seconds, tried, best):
    sides = []

    def timed(fn, args, size):
        sides.append(args[0].shape[0])
        return hardware.Timing(seconds[len(sides) - 1], 1.0)

    monkeypatch.setattr(hardware, "_seconds_per_call", timed)
    size = hardware.sizes("cpu", quick=False)
    rate, spread = hardware._matmul_flops_per_s(size.f32_n, jax.numpy.float32, "highest", size)
    assert sides == tried and rate == pytest.approx(best) and spread == 1.0


def test_repeats_that_disagree_are_suspect_on_any_device():
    calibration = {"device_kind": "cpu", "platform": "cpu"}
    spread = {"read_bytes_per_s": 1.6, "f32_flops_per_s": 1.1}
    (line,) = hardware.suspect({**calibration, "spread": spread})
    assert line.startswith("read_bytes_per_s") and "60%" in line
    assert hardware.suspect(calibration) == []  # a cache from before the spread was kept


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="widening is a CPU choice")
@pytest.mark.parametrize(("features", "operands"), [("avx2 fma", "f32"), ("avx512_bf16", "bf16")])
def test_the_bf16_peak_is_measured_on_the_product_the_model_computes(
    monkeypatch, features, operands
):
    """Where the model widens bf16 products to f32 (a CPU without bf16 arithmetic), so does the
    calibration: a roof measured on the slower narrow product would put the model above 100%."""
    monkeypatch.setattr(products, "cpu_features", lambda: frozenset(features.split()))
    a = jax.numpy.ones((8, 8), jax.numpy.bfloat16)
    text = jax.jit(hardware.product(jax.numpy.bfloat16, "default")).lower(a, a).as_text()
    (dot,) = [line for line in text.splitlines() if "dot_general" in line]
    assert dot.split(": (")[1].startswith(f"tensor<8x8x{operands}>")
    assert dot.endswith("-> tensor<8x8xf32>")
