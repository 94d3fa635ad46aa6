"""Published peaks by device kind, and a quick calibration cached per device."""

import json

import pytest

from jaxllm import hardware


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
    for key in ("f32_flops_per_s", "bf16_flops_per_s", "copy_bytes_per_s"):
        assert first[key] > 1e8  # any CPU does > 0.1 GFLOP/s and > 0.1 GB/s
    saved = json.loads(hardware.cache_path().read_text())
    assert saved == first and saved["date"] and saved["jax"]
    assert hardware.calibrate(quick=True) == first  # read back, not re-measured
    peaks = hardware.roofline_peaks(first, "float32")
    assert peaks["flops_per_s"] == first["f32_flops_per_s"]
    assert peaks["bandwidth_bytes_per_s"] == first["copy_bytes_per_s"]


def test_accelerator_roofline_uses_the_data_sheet():
    calibration = {
        "device_kind": "NVIDIA H100 80GB HBM3",
        "platform": "gpu",
        "f32_flops_per_s": 5e13,
        "bf16_flops_per_s": 7e14,
        "copy_bytes_per_s": 3e12,
        "date": "-",
    }
    peaks = hardware.roofline_peaks(calibration, "bfloat16")
    assert peaks["flops_per_s"] == 989e12 and peaks["bandwidth_bytes_per_s"] == 3.35e12
    measured = hardware.roofline_peaks(calibration, "bfloat16", data_sheet=False)
    assert measured["flops_per_s"] == 7e14 and measured["bandwidth_bytes_per_s"] == 3e12
