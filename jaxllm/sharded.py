"""``jaxllm analyze --phase train --mesh ... [--measure]``: the sharded train step per device, three
ways (and timed).

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

from jaxllm import analytic, collectives, hardware, shard_memory, train
from jaxllm import mesh as meshes
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
    xla = analyze_compiled(compiled, seconds)
    comms = collectives.train_collectives(config, sizes, batch, seq)
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
    measured = measure_train(compiled, config, optimizer, mesh, batch, seq) if measure else None
    return {
        "measured": measured,
        "mesh": sizes,
        "batch": batch,
        "seq": seq,
        "xla": xla.to_dict(),
        "analytic": {
            "flops": train_flops_per_device(config, sizes, batch, seq),
            "memory": shard_memory.train_memory_per_device(config, sizes, batch, seq),
            "collectives": {k: c.bytes for k, c in comms.items()},
            "link_bytes": link_bytes,
        },
        "hlo_collectives": collectives.hlo_collectives(compiled.as_text()),
        "predicted": predicted.to_dict(),
        "link_bytes_per_s": link,
        "link_source": link_source,
    }


def table(row: dict[str, Any]) -> list[str]:
    """``jaxllm analyze --mesh``'s lines: per device, analytic beside XLA."""
    a, x, p = row["analytic"], row["xla"], row["predicted"]
    mesh = ",".join(f"{k}={v}" for k, v in row["mesh"].items())
    hlo = ", ".join(f"{k} {si(v, 'B')}" for k, v in row["hlo_collectives"].items() if v)
    closed = ", ".join(f"{k} {si(v, 'B')}" for k, v in a["collectives"].items() if v)
    m = a["memory"]
    held = m["params"] + m["adam"] + m["batch"]
    working = m["grads"] + m["activations"] + m["gathered"]
    return [
        f"train B={row['batch']} T={row['seq']} on mesh {mesh}, per device",
        f"{'':<26}{'analytic':>14}{'XLA':>14}",
        f"{'FLOPs':<26}{si(a['flops'], 'F'):>14}{si(x['flops'], 'F'):>14}",
        f"{'state + batch (args)':<26}{si(held, 'B'):>14}{si(x['argument_bytes'], 'B'):>14}",
        f"{'grads + acts + gathered':<26}{si(working, 'B'):>14}{si(x['temp_bytes'], 'B'):>14}",
        f"{'total (XLA: footprint)':<26}{si(m['total'], 'B'):>14}{si(x['footprint_bytes'], 'B'):>14}",
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
