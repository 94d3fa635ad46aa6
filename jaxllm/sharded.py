"""``jaxllm analyze --phase train|prefill|decode --mesh ... [--measure]``: a sharded phase per device,
three ways (and timed).

XLA's cost and memory analyses of a sharded program are per device; beside them the closed-form
per-device memory (``jaxllm.shard_memory``), the collectives counted in the compiled HLO and in closed
form (``jaxllm.collectives``), and the step predicted as compute, memory and communication terms
(``jaxllm.roofline.step_time``). On a known accelerator the link is its published within-node
bandwidth (``jaxllm.hardware``); simulated CPU devices share one host, so each gets 1/n of its
calibrated peaks and their "link" is 1/n of the calibrated copy bandwidth.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm import analytic, collectives, hardware, phases, serve, shard_memory, train
from jaxllm import mesh as meshes
from jaxllm.cache import KVCache, cache_dtype
from jaxllm.config import ModelConfig
from jaxllm.cost import analyze_compiled, compile_timed
from jaxllm.model import param_shapes
from jaxllm.roofline import step_time
from jaxllm.tables import si
from jaxllm.timing import time_compiled


def train_flops_per_device(config: ModelConfig, sizes: dict[str, int], batch: int, seq: int) -> int:
    """Closed-form FLOPs of one device's share of a train step: the batch split over data x fsdp,
    the layers' matmuls and attention over tensor; the head (replicated on tensor) is not split."""
    local = batch // (sizes[meshes.DATA] * sizes[meshes.FSDP])
    head = 3 * 2 * config.d_model * config.vocab_size * local * seq
    return (analytic.train_flops(config, local, seq) - head) // sizes[meshes.TENSOR] + head


def link_bandwidth(calibration: dict[str, Any]) -> tuple[float, str]:
    """Bytes/s one direction of a device's link, and where the figure comes from."""
    sheet = hardware.published(calibration["device_kind"])
    if calibration["platform"] != "cpu" and sheet is not None and sheet.link_bytes_per_s:
        return sheet.link_bytes_per_s, sheet.link_source
    return calibration["copy_bytes_per_s"], "simulated devices: shared memory (calibrated copy)"


def measure_train(
    compiled: Any, config: ModelConfig, optimizer: Any, mesh: Mesh, batch: int, seq: int
) -> dict[str, Any]:
    """Wall-clock seconds of the compiled sharded step on a fresh state laid out on ``mesh`` (copied
    before each call: the step donates it) and a random batch split across data and fsdp."""
    state = train.init_state(config, optimizer, jax.random.key(0), mesh)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    tokens = jax.device_put(tokens, meshes.shardings(mesh, meshes.batch_spec()))
    layout = train.state_shardings(config, optimizer, mesh)
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=layout)
    return time_compiled(compiled, lambda: (copy(state), tokens), repeats=5, warmup=1).to_dict()


def analyze_train(
    config: ModelConfig,
    mesh: Mesh,
    batch: int,
    seq: int,
    calibration: dict[str, Any],
    measure: bool = False,
) -> dict[str, Any]:
    """The sharded train step on tokens [B, T] per device: XLA, closed form, predicted time and,
    with ``measure``, the measured time."""
    meshes.check_divides(mesh, config, batch)
    sizes = dict(mesh.shape)
    optimizer = train.make_optimizer()
    step = train.make_train_step(config, optimizer, mesh=mesh)
    state = jax.eval_shape(lambda p: train.state_from_params(p, optimizer), param_shapes(config))
    compiled, seconds = compile_timed(
        step, state, jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    )
    measured = measure_train(compiled, config, optimizer, mesh, batch, seq) if measure else None
    analytic_view = {
        "flops": train_flops_per_device(config, sizes, batch, seq),
        "memory": shard_memory.train_memory_per_device(config, sizes, batch, seq),
    }
    comms = collectives.train_collectives(config, sizes, batch, seq)
    row = {"phase": "train", "mesh": sizes, "batch": batch, "seq": seq, "measured": measured}
    return row | _views(config, mesh, compiled, seconds, analytic_view, comms, calibration)


def _views(
    config: ModelConfig,
    mesh: Mesh,
    compiled: Any,
    seconds: float,
    analytic_view: dict[str, Any],
    comms: dict[str, collectives.Collective],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """XLA's per-device cost of ``compiled`` beside the closed form (``analytic_view``: flops and
    memory; ``comms``), the collectives in its HLO, and the step predicted as compute, memory and
    communication on the calibrated (simulated CPU devices: shared) or published peaks."""
    xla = analyze_compiled(compiled, seconds)
    link_bytes = sum(c.link_bytes for c in comms.values())
    peaks = hardware.roofline_peaks(calibration, config.dtype)
    link, link_source = link_bandwidth(calibration)
    # Simulated CPU devices run on one host: each gets 1/n of its calibrated peaks.
    shared = mesh.size if calibration["platform"] == "cpu" else 1
    predicted = step_time(
        xla.flops,
        xla.bytes_accessed,
        link_bytes,
        peaks.flops_per_s / shared,
        peaks.bandwidth_bytes_per_s / shared,
        link / shared,
    )
    return {
        "xla": xla.to_dict(),
        "analytic": analytic_view
        | {"collectives": {k: c.bytes for k, c in comms.items()}, "link_bytes": link_bytes},
        "hlo_collectives": collectives.hlo_collectives(compiled.as_text()),
        "predicted": predicted.to_dict(),
        "link_bytes_per_s": link,
        "link_source": link_source,
    }


def serve_flops_per_device(
    config: ModelConfig, sizes: dict[str, int], phase: str, batch: int, seq: int, capacity: int
) -> int:
    """Closed-form FLOPs of one device's share of a prefill of [B, T] or a decode step completing
    T tokens over ``capacity`` slots: the batch split over data x fsdp, the layers over tensor; the
    head (at one position per row, replicated on tensor) is not split."""
    local = batch // (sizes[meshes.DATA] * sizes[meshes.FSDP])
    if phase == "prefill":
        total = analytic.prefill_flops(config, local, seq, 0, "xla", 1)
    else:
        total = analytic.decode_flops(config, local, seq - 1, capacity, "xla")
    head = 2 * config.d_model * config.vocab_size * local
    return (total - head) // sizes[meshes.TENSOR] + head


def _serve_args(config: ModelConfig, phase: str, batch: int, seq: int, capacity: int) -> tuple:
    """Abstract (params, cache, tokens[, pad]) of a prefill of [B, T] or a decode step."""
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, capacity))
    if phase == "prefill":
        rows = (
            jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
        )
    else:
        rows = (jax.ShapeDtypeStruct((batch,), jnp.int32),)
    return (param_shapes(config), cache, *rows)


def measure_serve(compiled: Any, config: ModelConfig, mesh: Mesh, args: tuple) -> dict[str, Any]:
    """Wall-clock seconds of the compiled sharded phase: filler weights and zero token ids laid out
    on ``mesh``, a fresh empty cache made in place before each call (the phase donates it)."""
    at = meshes.ServeLayout.of(mesh, config)
    params = jax.device_put(phases.filler_params(args[0]), at.params)
    rows = [jax.device_put(jnp.zeros(a.shape, a.dtype), at.rows) for a in args[2:]]
    batch, capacity = args[1].batch, args[1].capacity
    empty = jax.jit(lambda: KVCache.init(config, batch, capacity), out_shardings=at.cache)
    timing = time_compiled(compiled, lambda: (params, empty(), *rows), repeats=5, warmup=1)
    return timing.to_dict()


def analyze_serve(
    config: ModelConfig,
    mesh: Mesh,
    phase: str,
    batch: int,
    seq: int,
    calibration: dict[str, Any],
    measure: bool = False,
) -> dict[str, Any]:
    """A sharded prefill of [B, T] tokens or decode step completing T tokens, per device, as
    ``analyze_train`` does the train step; served as ``jaxllm.generate`` serves (unrolled layers,
    weights in the compute dtype), the cache of a decode step sized as ``phases.cache_capacity``."""
    meshes.check_divides(mesh, config, batch)
    config, sizes = serve.serving_config(config, mesh), dict(mesh.shape)
    capacity = phases.cache_capacity(config, phase, seq)
    make = serve.make_prefill if phase == "prefill" else serve.make_decode_step
    args = _serve_args(config, phase, batch, seq, capacity)
    compiled, seconds = compile_timed(make(config, mesh).jitted, *args)
    tokens, kv = (seq if phase == "prefill" else 1), cache_dtype(config)
    analytic_view = {
        "flops": serve_flops_per_device(config, sizes, phase, batch, seq, capacity),
        "memory": shard_memory.serve_memory_per_device(config, sizes, batch, tokens, capacity, kv),
    }
    comms = collectives.serve_collectives(config, sizes, batch, tokens, kv)
    measured = measure_serve(compiled, config, mesh, args) if measure else None
    row = {"phase": phase, "mesh": sizes, "batch": batch, "seq": seq, "measured": measured}
    return row | _views(config, mesh, compiled, seconds, analytic_view, comms, calibration)


def analyze(
    config: ModelConfig,
    mesh: Mesh,
    phase: str,
    batch: int,
    seq: int,
    calibration: dict[str, Any],
    measure: bool = False,
) -> dict[str, Any]:
    """``analyze_train`` or ``analyze_serve``, by ``phase``."""
    if phase == "train":
        return analyze_train(config, mesh, batch, seq, calibration, measure)
    return analyze_serve(config, mesh, phase, batch, seq, calibration, measure)


def _memory_lines(phase: str, m: dict[str, int], x: dict[str, Any]) -> list[str]:
    """The memory rows of the table: what the program holds as arguments, and the rest."""
    rows: list[tuple[str, int | None, int]]
    if phase == "train":
        held = m["params"] + m["adam"] + m["batch"]
        rows = [
            ("state + batch (args)", held, x["argument_bytes"]),
            (
                "grads + acts + gathered",
                m["grads"] + m["activations"] + m["gathered"],
                x["temp_bytes"],
            ),
            ("total (XLA: footprint)", m["total"], x["footprint_bytes"]),
        ]
    else:
        rows = [
            ("params + cache + inputs (args)", m["total"], x["argument_bytes"]),
            ("temp (XLA only)", None, x["temp_bytes"]),
        ]
    return [
        f"{what:<31}{'-' if a is None else si(a, 'B'):>12}{si(b, 'B'):>12}" for what, a, b in rows
    ]


def table(row: dict[str, Any]) -> list[str]:
    """``jaxllm analyze --mesh``'s lines: per device, analytic beside XLA."""
    a, x, p = row["analytic"], row["xla"], row["predicted"]
    mesh = ",".join(f"{k}={v}" for k, v in row["mesh"].items())
    hlo = ", ".join(f"{k} {si(v, 'B')}" for k, v in row["hlo_collectives"].items() if v)
    closed = ", ".join(f"{k} {si(v, 'B')}" for k, v in a["collectives"].items() if v)
    return [
        f"{row['phase']} B={row['batch']} T={row['seq']} on mesh {mesh}, per device",
        f"{'':<31}{'analytic':>12}{'XLA':>12}",
        f"{'FLOPs':<31}{si(a['flops'], 'F'):>12}{si(x['flops'], 'F'):>12}",
        *_memory_lines(row["phase"], a["memory"], x),
        f"collectives in the HLO: {hlo or 'none'}",
        f"collectives in closed form: {closed or 'none'}; {si(a['link_bytes'], 'B')} over links",
        f"predicted: compute {si(p['compute_seconds'], 's')} + memory {si(p['memory_seconds'], 's')}"
        f" -> max + communication {si(p['communication_seconds'], 's')}"
        f" = {si(p['predicted_seconds'], 's')} (link {si(row['link_bytes_per_s'], 'B/s')}:"
        f" {row['link_source']})",
    ] + (
        [f"measured: {si(row['measured']['seconds_median'], 's')} (median of 5)"]
        if row["measured"]
        else []
    )
