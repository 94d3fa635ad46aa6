"""The projection of a sharded train step onto published devices, against independent counts."""

import numpy as np
import pytest

from jaxllm import analytic, hardware, projection
from jaxllm import mesh as meshes
from jaxllm.config import PRESETS

H100 = hardware.published("NVIDIA H100 80GB HBM3")
LLAMA = PRESETS["llama3-8b"].replace(dtype="bfloat16", remat="full")


def _cluster(devices: int) -> projection.Cluster:
    assert H100 is not None
    return projection.Cluster(H100, devices)


def test_fsdp_divides_every_parameter_but_the_norms():
    """On fsdp=8 a device holds 1/8 of every weight split along D; the norm scales [D] are whole."""
    out = projection.project_train(LLAMA, meshes.parse_mesh("fsdp=8"), 8, 128, _cluster(8))
    counts = analytic.param_counts(LLAMA)
    norms = counts["norms"]
    assert out["memory"]["params"] == 4 * ((counts["total"] - norms) // 8 + norms)


def test_the_fit_verdict_against_the_state_alone():
    """data=8 replicates params (4 B), gradients (4 B) and AdamW (8 B) per parameter: 16 B x 8.0e9
    is past 80 GB before any activation; a tiny model fits anywhere."""
    state = 16 * analytic.param_counts(LLAMA)["total"]
    assert H100 is not None and state > H100.memory_bytes
    assert not projection.project_train(LLAMA, meshes.parse_mesh("data=8"), 8, 128, _cluster(8))[
        "fits"
    ]
    tiny = PRESETS["tiny"].replace(n_heads=8, n_kv_heads=8)
    assert projection.project_train(tiny, meshes.parse_mesh("fsdp=8"), 8, 16, _cluster(8))["fits"]


@pytest.mark.parametrize("spec", ["data=8,tensor=8", "data=8,fsdp=8", "fsdp=16,tensor=4"])
def test_a_group_is_within_a_node_when_its_devices_are(spec):
    """Each family's groups, read off the device ids laid out as make_mesh lays them (node = id // 8):
    "node" when every group sits in one node."""
    sizes = meshes.parse_mesh(spec)
    ids = np.arange(64).reshape([sizes[a] for a in meshes.AXES])
    for family, axes in projection.FAMILY_AXES.items():
        moved = [meshes.AXES.index(a) for a in axes]
        groups = np.moveaxis(ids, moved, range(-len(moved), 0)).reshape(
            -1, np.prod([sizes[a] for a in axes])
        )
        within = all(len(set(g // 8)) == 1 for g in groups)
        _, where = projection.family_bandwidth(_cluster(64), sizes, family)
        assert where == ("node" if within else "network"), family


def test_pure_data_parallel_communication_is_the_ring_all_reduce_over_infiniband():
    """data=64: every float32 gradient all-reduced over 64 GPUs on 8 nodes: 2 x 63/64 of it (the
    tied head counted once: untied in llama) at 50 GB/s."""
    out = projection.project_train(LLAMA, meshes.parse_mesh("data=64"), 64, 128, _cluster(64))
    assert H100 is not None and H100.network_bytes_per_s
    grads = 4 * analytic.param_counts(LLAMA)["total"]
    expected = 2 * 63 / 64 * grads / H100.network_bytes_per_s
    assert out["predicted"]["communication_seconds"] == pytest.approx(expected, rel=1e-9)
    assert out["bound"] == "communication" and out["links"] == {"grads": "network"}
