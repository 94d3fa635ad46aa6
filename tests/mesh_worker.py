"""Runs sharded phases on 8 simulated CPU devices beside the same phase on one device; prints JSON.

``python tests/mesh_worker.py train data=2,tensor=4 fsdp=4,tensor=2 ...`` prints, per mesh, the
largest absolute difference of the loss, grad norm, parameters and AdamW moments after two train
steps (``train_unrolled``: the same with unrolled layers); ``serve`` the same of a prefill and two
greedy decode steps with params and cache placed on the mesh, and the decode step's collectives; ``analyze`` prints, per mesh, the
collective bytes of the compiled step beside ``collectives.train_comm`` and XLA's per-device memory
(arguments, and the footprint: argument + output - alias + temp) beside
``shard_memory.train_memory_per_device``. Run in a subprocess by tests/test_mesh.py: the device count is fixed when JAX first starts,
and the rest of the suite runs on one device.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # simulated CPU devices, on a GPU machine too

import json
import math

import jax
import jax.numpy as jnp

from jaxllm import collectives, serve, shard_memory, train
from jaxllm import mesh as meshes
from jaxllm.cache import KVCache
from jaxllm.config import ModelConfig
from jaxllm.cost import analyze_compiled
from jaxllm.model import init_params, param_shapes

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# Divisible by every experiment mesh: 8 heads (tensor <= 8), D = 32 (fsdp <= 8), B = 8 (data x fsdp).
CONFIG = ModelConfig(n_heads=8, n_kv_heads=8)
BATCH, SEQ, STEPS = 8, 16, 2


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def _run_train(config: ModelConfig, mesh) -> tuple:
    optimizer = train.make_optimizer(warmup=0, total_steps=10)
    state = train.init_state(config, optimizer, jax.random.key(0), mesh)
    step = train.make_train_step(config, optimizer, mesh=mesh)
    metrics = []
    for i in range(STEPS):
        batch = jax.random.randint(jax.random.key(i + 1), (BATCH, SEQ + 1), 0, config.vocab_size)
        state, m = step(state, batch)
        metrics.append(m)
    return jax.device_get(state), jax.device_get(metrics)


def train_diffs(config: ModelConfig, spec: str) -> dict:
    """Differences between two train steps on ``spec``'s mesh and on one device."""
    ref_state, ref_metrics = _run_train(config, None)
    mesh = meshes.make_mesh(meshes.parse_mesh(spec))
    meshes.check_divides(mesh, config, BATCH)
    state, metrics = _run_train(config, mesh)
    return {
        "loss": _max_diff([m["loss"] for m in metrics], [m["loss"] for m in ref_metrics]),
        "grad_norm": _max_diff(
            [m["grad_norm"] for m in metrics], [m["grad_norm"] for m in ref_metrics]
        ),
        "params": _max_diff(state.params, ref_state.params),
        "opt_state": _max_diff(state.opt_state, ref_state.opt_state),
        "loss_value": float(ref_metrics[-1]["loss"]),
    }


def analysis(config: ModelConfig, spec: str) -> dict:
    """The compiled sharded step's collectives and memory beside the closed-form counts."""
    sizes = meshes.parse_mesh(spec)
    optimizer = train.make_optimizer()
    step = train.make_train_step(config, optimizer, mesh=meshes.make_mesh(sizes))
    state = jax.eval_shape(lambda p: train.state_from_params(p, optimizer), param_shapes(config))
    compiled = step.lower(state, jax.ShapeDtypeStruct((BATCH, SEQ + 1), jnp.int32)).compile()
    xla = analyze_compiled(compiled, 0.0)
    return {
        "hlo": collectives.hlo_collectives(compiled.as_text()),
        "analytic": collectives.train_comm(config, sizes, BATCH, SEQ),
        "argument_bytes": xla.argument_bytes,
        "footprint_bytes": xla.footprint_bytes,
        "memory": shard_memory.train_memory_per_device(config, sizes, BATCH, SEQ),
    }


def _run_serve(config: ModelConfig, mesh) -> tuple:
    """A prefill of [B, SEQ // 2] left-padded prompts and two greedy decode steps; params and
    cache placed on ``mesh`` (None: one device) and the phases' own jit propagating from them."""
    params = init_params(config, jax.random.key(0))
    cache = KVCache.init(config, BATCH, SEQ)
    if mesh is not None:
        params = jax.device_put(params, meshes.shardings(mesh, meshes.param_specs(params)))
        cache = jax.device_put(cache, meshes.shardings(mesh, meshes.cache_specs(cache)))
    placed = cache.k[0].sharding
    prompts = jax.random.randint(jax.random.key(9), (BATCH, SEQ // 2), 0, config.vocab_size)
    pad = jnp.arange(BATCH, dtype=jnp.int32) % 3
    logits, cache = serve.make_prefill(config).jitted(params, cache, prompts, pad)
    out = [logits]
    for _ in range(2):
        logits, cache = serve.make_decode_step(config).jitted(params, cache, out[-1].argmax(-1))
        out.append(logits)
    kept = cache.k[0].sharding.is_equivalent_to(placed, 4)
    decode = serve.make_decode_step(config).jitted.lower(params, cache, out[-1].argmax(-1))
    comm = collectives.hlo_collectives(decode.compile().as_text())
    return jax.device_get(out), jax.device_get((cache.k, cache.v)), kept, comm


def serve_diffs(config: ModelConfig, spec: str) -> dict:
    """Differences between prefill + two decode steps on ``spec``'s mesh and on one device."""
    ref_logits, ref_kv, *_ = _run_serve(config, None)
    mesh = meshes.make_mesh(meshes.parse_mesh(spec))
    meshes.check_divides(mesh, config, BATCH)
    logits, kv, kept, comm = _run_serve(config, mesh)
    return {
        "logits": _max_diff(logits, ref_logits),
        "cache": _max_diff(kv, ref_kv),
        "cache_sharding_kept": kept,
        "decode_collectives": comm,
        "cache_bytes_per_device": KVCache.init(config, BATCH, SEQ).nbytes()
        // math.prod(mesh.shape.values()),
    }


def main(argv: list[str]) -> None:
    phase, *specs = argv
    config = CONFIG.replace(scan_layers=phase not in ("train_unrolled", "serve"))
    run = {"analyze": analysis, "serve": serve_diffs}.get(phase, train_diffs)
    out = {spec: run(config, spec) for spec in specs}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
