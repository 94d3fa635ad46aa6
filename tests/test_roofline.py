"""The roofline verdict against hand-computed cases."""

import pytest

from jaxllm.roofline import roofline

PEAK, BW = 100e12, 2e12  # ridge = 50 FLOP/byte


def test_memory_bound_below_the_ridge():
    r = roofline(flops=1e9, nbytes=1e9, peak_flops_per_s=PEAK, bandwidth_bytes_per_s=BW)
    assert r.intensity == 1.0 and r.ridge == 50.0 and r.bound == "memory"
    assert r.predicted_seconds == pytest.approx(1e9 / BW)
    assert r.mfu is None and r.efficiency is None and r.achieved_flops_per_s is None
    assert r.roof_flops_per_s == pytest.approx(BW * 1.0)  # on the slanted roof: bandwidth × I


def test_compute_bound_above_the_ridge_with_a_measured_time():
    r = roofline(1e12, 1e9, PEAK, BW, measured_seconds=0.02)
    assert r.bound == "compute" and r.predicted_seconds == pytest.approx(0.01)
    assert r.efficiency == pytest.approx(0.5)
    assert r.mfu == pytest.approx(1e12 / 0.02 / PEAK)
    assert r.mbu == pytest.approx(1e9 / 0.02 / BW)
    assert r.roof_flops_per_s == pytest.approx(PEAK) and r.achieved_flops_per_s == pytest.approx(
        5e13
    )


@pytest.mark.parametrize(
    ("args", "word"),
    [
        ((1.0, 1.0, 0.0, BW), "peaks"),
        ((1.0, 0.0, PEAK, BW), "bytes"),
        ((1.0, 1.0, PEAK, BW, 0), "measured"),
    ],
)
def test_bad_input_raises(args, word):
    with pytest.raises(ValueError, match=word):
        roofline(*args)
