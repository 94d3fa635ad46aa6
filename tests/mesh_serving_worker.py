"""Runs ``generate`` and the serving engine on 8 simulated CPU devices beside one device; prints JSON.

``python tests/mesh_serving_worker.py generate greedy,sampled data=2,tensor=4 ...`` prints, per mesh,
whether the tokens of each sampler equal one device's, the largest difference of the prefill logits and
what the compiled prefill and decode loop all-gather: any result shaped like a whole cache layer
[B, K, S', H] or a whole parameter. ``engine static,chunked tensor=8 ...`` prints whether the
engine's tokens under each policy equal one device's. ``analyze prefill,decode fsdp=8 ...`` prints
each phase's collectives in the compiled HLO beside ``collectives.serve_collectives`` and XLA's
argument bytes beside ``shard_memory.serve_memory_per_device``. Run in a subprocess by
tests/test_mesh_serving.py: the device count is fixed when JAX first starts, and the rest of the
suite runs on one device.
"""

import os
import sys
import tempfile

os.environ["JAXLLM_CACHE_DIR"] = tempfile.mkdtemp()  # a quick calibration of its own, not cached
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # simulated CPU devices, on a GPU machine too

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import collectives, hardware, serve, sharded
from jaxllm import generate as gen
from jaxllm import mesh as meshes
from jaxllm.batching import make_batch
from jaxllm.cache import cache_dtype
from jaxllm.config import ModelConfig
from jaxllm.engine import Engine, SamplingParams
from jaxllm.model import init_params
from jaxllm.sampling import GREEDY, Sampler

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

# Divisible by every experiment mesh: 8 heads (tensor <= 8), D = 32 (fsdp <= 8), B = 8 (data x fsdp).
CONFIG = ModelConfig(n_heads=8, n_kv_heads=8, scan_layers=False)
PROMPTS = [[(7 * i + j) % 256 for j in range(3 + 2 * i)] for i in range(8)]
NEW = 6
_GATHER = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(")


def _gathered(hlo_text: str) -> list[tuple[int, ...]]:
    """The result shape of every all-gather in an optimized HLO module."""
    return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _GATHER.findall(hlo_text)]


def _whole(shapes: list[tuple[int, ...]], config: ModelConfig, rows: int, mesh) -> dict:
    """How many gathered shapes are a whole cache layer (B and K both whole) or a whole parameter."""
    served = serve.serving_config(config, mesh)
    params = {tuple(x.shape) for x in jax.tree.leaves(init_params(served, jax.random.key(0)))}
    cache = [s for s in shapes if len(s) == 4 and s[:2] == (rows, config.n_kv_heads)]
    return {"cache": len(cache), "params": sum(s in params for s in shapes), "all": len(shapes)}


def _programs(config: ModelConfig, params, mesh) -> dict:
    """The all-gathers of the compiled prefill and decode loop of PROMPTS on ``mesh``."""
    served, params = serve.for_serving(config, params, mesh)
    batch = make_batch(served, PROMPTS, NEW)
    rows = batch.tokens.shape[0]
    params, cache = gen._place(served, params, batch, mesh)
    prefill = gen._compile_prefill(served, params, batch, mesh)
    loop = gen.make_decode_loop(served, GREEDY, batch.tokens.shape[1], batch.capacity, mesh)
    logits = jax.ShapeDtypeStruct((rows, config.vocab_size), jnp.float32)
    stop = np.zeros((0,), np.int32)
    decode = loop.lower(params, cache, logits, jax.random.key(0), batch.limits, stop).compile()
    return {
        "prefill": _whole(_gathered(prefill.as_text()), config, rows, mesh),
        "decode": _whole(_gathered(decode.as_text()), config, rows, mesh),
    }


SAMPLERS = {"greedy": GREEDY, "sampled": Sampler(temperature=1.0)}


def generate_diffs(spec: str, samplers: list[str]) -> dict:
    """``generate`` with each of ``samplers`` on ``spec``'s mesh beside one device."""
    params = init_params(CONFIG, jax.random.key(0))
    mesh = meshes.make_mesh(meshes.parse_mesh(spec))
    out: dict = {}
    for name in samplers:
        sampler = SAMPLERS[name]
        one = gen.generate(CONFIG, params, PROMPTS, NEW, sampler, jax.random.key(3))
        many = gen.generate(CONFIG, params, PROMPTS, NEW, sampler, jax.random.key(3), mesh=mesh)
        out[name] = one.tokens == many.tokens
        out[f"{name}_tokens"] = sum(map(len, many.tokens))
    served, placed = serve.for_serving(CONFIG, params, mesh)  # the same program on both
    batch = make_batch(served, PROMPTS, NEW)
    logits = []
    for m in (None, mesh):
        p, cache = gen._place(served, placed, batch, m)
        logits.append(serve.make_prefill(served, m)(p, cache, batch.tokens, batch.pad)[0])
    out["prefill_logits"] = float(jnp.max(jnp.abs(logits[0] - logits[1])))
    out["prefill_logits_sharding"] = str(logits[1].sharding.spec)
    out["gathers"] = _programs(CONFIG, params, mesh)
    return out


def _engine_tokens(policy: str, mesh) -> list[list[int]]:
    params = init_params(CONFIG, jax.random.key(0))
    engine = Engine(CONFIG, params, slots=4, capacity=64, policy=policy, chunk=16, mesh=mesh)
    sampled = SamplingParams(temperature=1.0, seed=5)
    requests = [
        engine.submit(p, NEW + i, sampled if i % 2 else SamplingParams())
        for i, p in enumerate(PROMPTS)
    ]
    engine.run_until_idle()
    return [r.tokens for r in requests]


def engine_diffs(spec: str, policies: list[str]) -> dict:
    """Each policy's tokens on ``spec``'s (tensor-only) mesh, over as many devices as it needs,
    beside one device."""
    sizes = meshes.parse_mesh(spec)
    mesh = meshes.make_mesh(sizes, jax.devices()[: math.prod(sizes.values())])
    out = {}
    for policy in policies:
        one, many = _engine_tokens(policy, None), _engine_tokens(policy, mesh)
        out[policy] = one == many
        out[f"{policy}_tokens"] = sum(map(len, many))
    return out


def analysis(spec: str, phases: list[str]) -> dict:
    """Per phase: the compiled sharded program's collectives and arguments beside the closed form."""
    calibration = hardware.calibrate(quick=True)  # the prediction's peaks; not checked here
    mesh = meshes.make_mesh(meshes.parse_mesh(spec))
    served = serve.serving_config(CONFIG, mesh)
    out = {}
    for phase in phases:
        row = sharded.analyze_serve(CONFIG, mesh, phase, 8, 16, calibration)
        out[phase] = {
            "hlo": row["hlo_collectives"],
            "analytic": collectives.by_kind(
                collectives.serve_collectives(
                    served,
                    dict(mesh.shape),
                    8,
                    16 if phase == "prefill" else 1,
                    cache_dtype(served),
                )
            ),
            "argument_bytes": row["xla"]["argument_bytes"],
            "memory": row["analytic"]["memory"],
        }
    return out


def main(argv: list[str]) -> None:
    what, names, *specs = argv  # generate greedy,sampled SPEC ... | engine static,chunked SPEC ...
    run = {"generate": generate_diffs, "engine": engine_diffs, "analyze": analysis}[what]
    print(json.dumps({spec: run(spec, names.split(",")) for spec in specs}))


if __name__ == "__main__":
    main(sys.argv[1:])
