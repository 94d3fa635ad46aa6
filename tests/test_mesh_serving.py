"""Serving on a device mesh: ``generate`` and the engine on 8 simulated devices equal one device's,
with no all-gather of a whole cache layer (nor of a whole weight outside fsdp); a mesh that does not
fit the batch or the engine is a one-line error.

The 8-device runs are in a subprocess (tests/mesh_serving_worker.py): the device count is fixed when
JAX starts, and the rest of the suite runs on one device.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import mesh as meshes
from jaxllm.config import PRESETS
from jaxllm.engine import Engine, SamplingParams
from jaxllm.generate import generate
from jaxllm.model import init_params

WORKER = Path(__file__).with_name("mesh_serving_worker.py")
EXPERIMENT_MESHES = ["tensor=8", "data=8", "data=2,tensor=4", "data=4,tensor=2", "fsdp=4,tensor=2"]


def _worker(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_generate_equals_one_device(diffs: dict, samplers: list[str]) -> None:
    for spec, d in diffs.items():
        for name in samplers:  # token for token
            assert d[name] and d[f"{name}_tokens"] == 8 * 6, (spec, name)
        assert d["prefill_logits"] <= 1e-6, spec
        assert d["prefill_logits_sharding"] == "P(('data', 'fsdp'),)", spec
        fsdp = meshes.parse_mesh(spec)["fsdp"] > 1
        for program in ("prefill", "decode"):
            gathers = d["gathers"][program]
            assert gathers["cache"] == 0, (spec, program, gathers)  # never the whole cache
            if not fsdp:  # weights are gathered only where fsdp splits them (ZeRO-3)
                assert gathers["params"] == 0, (spec, program, gathers)


def test_greedy_generate_on_a_3d_mesh_equals_one_device():
    diffs = _worker("generate", "greedy", "data=2,fsdp=2,tensor=2")
    _assert_generate_equals_one_device(diffs, ["greedy"])


@pytest.mark.slow
def test_greedy_and_sampled_generate_on_every_experiment_mesh_equal_one_device():
    diffs = _worker("generate", "greedy,sampled", "data=2,fsdp=2,tensor=2", *EXPERIMENT_MESHES)
    _assert_generate_equals_one_device(diffs, ["greedy", "sampled"])


def _assert_engine_equals_one_device(diffs: dict, policies: list[str]) -> None:
    for spec, d in diffs.items():
        for policy in policies:
            assert d[policy], (spec, policy)
            assert d[f"{policy}_tokens"] == sum(6 + i for i in range(8)), (spec, policy)


def test_an_engine_on_a_one_device_mesh_runs_its_sharded_programs():
    """The explicit-sharding path in this process: the mesh's programs and cache layout, the same
    tokens as without a mesh."""
    params = init_params(CONFIG, jax.random.key(0))
    tokens = []
    for mesh in (None, meshes.make_mesh({})):
        engine = Engine(CONFIG, params, slots=2, capacity=32, mesh=mesh)
        requests = [engine.submit([1, 2, 3], 4), engine.submit([4, 5], 3, SamplingParams(1.0))]
        engine.run_until_idle()
        tokens.append([r.tokens for r in requests])
        if mesh is not None:
            layout = engine.cache.k[0].sharding
            assert isinstance(layout, NamedSharding) and layout.spec == P(
                None, "tensor", None, None
            )
    assert tokens[0] == tokens[1] and list(map(len, tokens[1])) == [4, 3]


@pytest.mark.slow
def test_chunked_engine_on_tensor_8_equals_one_device():
    _assert_engine_equals_one_device(_worker("engine", "chunked", "tensor=8"), ["chunked"])


@pytest.mark.slow
def test_every_policy_on_tensor_parallel_meshes_equals_one_device():
    policies = ["static", "continuous", "chunked"]
    diffs = _worker("engine", ",".join(policies), "tensor=8", "tensor=2")
    _assert_engine_equals_one_device(diffs, policies)


class _FakeMesh:
    """Only ``shape``: the checks read nothing else, so axis sizes need no devices."""

    def __init__(self, **sizes: int) -> None:
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1} | sizes


CONFIG = PRESETS["tiny"].replace(n_heads=8, n_kv_heads=8)


def test_an_engine_mesh_with_data_or_fsdp_is_one_line_naming_the_axis():
    params = init_params(CONFIG, jax.random.key(0))
    for axis in ("data", "fsdp"):
        with pytest.raises(ValueError, match=f"tensor only, got mesh axis {axis}=2") as err:
            Engine(CONFIG, params, slots=2, capacity=32, mesh=_FakeMesh(**{axis: 2}))  # pyright: ignore[reportArgumentType]
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="tensor=16 does not divide n_heads=8"):
        Engine(CONFIG, params, slots=2, capacity=32, mesh=_FakeMesh(tensor=16))  # pyright: ignore[reportArgumentType]


def test_generate_on_a_mesh_that_does_not_divide_the_prompts_names_the_axis():
    params = init_params(CONFIG, jax.random.key(0))
    with pytest.raises(ValueError, match="data x fsdp=4 does not divide prompts=3"):
        generate(CONFIG, params, [[1, 2], [3], [4, 5, 6]], 2, mesh=_FakeMesh(data=4))  # pyright: ignore[reportArgumentType]


def _assert_analysis_matches_the_closed_form(rows: dict) -> None:
    """Each phase's collectives in the compiled HLO equal the closed form, byte for byte, and XLA's
    per-device arguments equal the parameters', cache's and inputs' shares."""
    for spec, phases in rows.items():
        for phase, d in phases.items():
            assert d["hlo"] == d["analytic"], (spec, phase)
            assert d["argument_bytes"] == d["memory"]["total"], (spec, phase)


def test_serving_collectives_and_memory_on_dp_fsdp_tp_and_every_experiment_mesh():
    """Compiled only (20 s for the 14 programs on the 2-core VM)."""
    meshes_ = ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", *EXPERIMENT_MESHES]
    rows = _worker("analyze", "prefill,decode", *meshes_)
    _assert_analysis_matches_the_closed_form(rows)
    decode = rows["data=2,fsdp=2,tensor=2"]["decode"]["hlo"]
    assert decode["all-gather"] > 0 and decode["all-reduce"] > 0
