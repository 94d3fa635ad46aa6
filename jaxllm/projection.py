"""A sharded train step projected onto a cluster of published devices, in closed form: nothing runs.

Per device: the memory it holds (``jaxllm.shard_memory``) against the device's capacity, and the
step as compute + memory + communication (``jaxllm.roofline.step_time``) at the data sheet's peaks
(``jaxllm.hardware``). A projection, not a measurement.

Links: devices fill nodes of ``per_node`` in mesh order (``jaxllm.mesh.make_mesh``: tensor innermost,
then fsdp, then data). A collective whose group fits within one node runs over the node's link
(NVLink); one that spans nodes is bound by the network (InfiniBand: one port per GPU), each
device's ring traffic crossing it. The closed-form collectives are ``jaxllm.collectives``': weights
gathered over fsdp, gradients all-reduced over data x fsdp, activations over tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxllm import collectives, shard_memory
from jaxllm import mesh as meshes
from jaxllm.analytic import ADAM_MOMENTS
from jaxllm.config import ModelConfig
from jaxllm.hardware import Published
from jaxllm.roofline import step_time
from jaxllm.sharded import train_flops_per_device

# The mesh axes each closed-form collective family runs over.
FAMILY_AXES = {"gather": (meshes.FSDP,), "grads": meshes.BATCH, "tensor": (meshes.TENSOR,)}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """``devices`` of one published kind, ``per_node`` of them sharing a node's link."""

    sheet: Published
    devices: int
    per_node: int = 8


def span(sizes: dict[str, int], axes: tuple[str, ...]) -> int:
    """Consecutive devices a group over ``axes`` covers in mesh order (tensor innermost): the product
    of the sizes from the outermost of ``axes`` inward."""
    outer = min(meshes.AXES.index(a) for a in axes)
    return math.prod(sizes[a] for a in meshes.AXES[outer:])


def family_bandwidth(cluster: Cluster, sizes: dict[str, int], family: str) -> tuple[float, str]:
    """Bytes/s one direction per device for a collective family, and which link it is."""
    link, network = cluster.sheet.link_bytes_per_s, cluster.sheet.network_bytes_per_s
    if link is None or network is None:
        raise ValueError(f"{cluster.sheet.name} has no published link bandwidths")
    if span(sizes, FAMILY_AXES[family]) <= cluster.per_node:
        return link, "node"
    return network, "network"


def train_traffic_per_device(
    config: ModelConfig, sizes: dict[str, int], batch: int, seq: int
) -> int:
    """Bytes one device must move to and from its memory in a train step on tokens [B, T], at least:
    the weights it multiplies (gathered over fsdp, param dtype) read in the forward and again for the
    backward's input gradients; its gradient written (float32, gathered size); AdamW reading the
    parameters, gradient shard and moments and writing parameters and moments; activations written
    in the forward and read in the backward (``shard_memory``'s counts)."""
    m = shard_memory.train_memory_per_device(config, sizes, batch, seq)
    weights = m["grads"] // 4 * config.storage_dtype.itemsize  # the gathered parameters
    grad_shard = m["adam"] // ADAM_MOMENTS
    optimizer = 2 * m["params"] + grad_shard + 2 * m["adam"]
    return 2 * weights + m["grads"] + optimizer + 2 * m["activations"]


def project_train(
    config: ModelConfig, sizes: dict[str, int], batch: int, seq: int, cluster: Cluster
) -> dict[str, Any]:
    """One train step on tokens [B, T] on a mesh of ``sizes`` over ``cluster``, per device: memory
    (bytes, and whether it fits the device), the three-term step time (seconds) at bf16 dense peak
    and HBM bandwidth, each collective family's link bytes and link, and the bound: ``communication``
    when the collectives take longer than max(compute, memory), else the larger of those two."""
    if math.prod(sizes[a] for a in meshes.AXES) != cluster.devices:
        raise ValueError(f"mesh {sizes} does not cover {cluster.devices} devices")
    memory = shard_memory.train_memory_per_device(config, sizes, batch, seq)
    comms = collectives.train_collectives(config, sizes, batch, seq)
    links = {name: family_bandwidth(cluster, sizes, name) for name in comms}
    link_bytes = sum(c.link_bytes for c in comms.values())
    seconds = sum(c.link_bytes / links[name][0] for name, c in comms.items())
    # One effective bandwidth gives each family's bytes over its own link: sum(bytes_i / bw_i).
    effective = link_bytes / seconds if seconds else cluster.sheet.link_bytes_per_s or 1.0
    sheet = cluster.sheet
    time = step_time(
        train_flops_per_device(config, sizes, batch, seq),
        train_traffic_per_device(config, sizes, batch, seq),
        link_bytes,
        sheet.bf16_flops_per_s,
        sheet.bandwidth_bytes_per_s,
        effective,
    )
    busy = max(time.compute_seconds, time.memory_seconds)
    bound = "compute" if time.compute_seconds >= time.memory_seconds else "memory"
    return {
        "mesh": sizes,
        "memory": memory,
        "fits": memory["total"] <= sheet.memory_bytes,
        "capacity_bytes": sheet.memory_bytes,
        "link_bytes": {name: c.link_bytes for name, c in comms.items()},
        "links": {name: where for name, (_, where) in links.items() if comms[name].bytes},
        "predicted": time.to_dict(),
        "bound": "communication" if time.communication_seconds > busy else bound,
    }
