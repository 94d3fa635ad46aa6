"""Closed-form bytes per device of a train step on a mesh: each array divided as the partition rules
(``jaxllm.mesh``) split it.

Parameters, gradients and AdamW's m and v are divided by the mesh axes their rule names (fsdp and
tensor; replicated on data); the batch [B, T+1] by data x fsdp. Activations are counted at the
per-device batch B / (data x fsdp) and not divided by tensor: an upper bound where tensor > 1.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jaxllm import analytic
from jaxllm import mesh as meshes
from jaxllm.config import ModelConfig
from jaxllm.model import param_shapes


def ways(spec: PartitionSpec, sizes: dict[str, int]) -> int:
    """Into how many pieces ``spec`` splits an array on a mesh of ``sizes``."""
    axes = [
        a
        for entry in spec
        if entry is not None
        for a in (entry if isinstance(entry, tuple) else (entry,))
    ]
    return math.prod(sizes[a] for a in axes)


def _sharded_elements(sizes: dict[str, int], config: ModelConfig) -> int:
    shapes = param_shapes(config)
    specs = jax.tree.leaves(
        meshes.param_specs(shapes), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    return sum(
        math.prod(s.shape) // ways(p, sizes)
        for s, p in zip(jax.tree.leaves(shapes), specs, strict=True)
    )


def train_memory_per_device(
    config: ModelConfig, sizes: dict[str, int], batch: int, seq: int
) -> dict[str, Any]:
    """Bytes one device holds in a train step on tokens [B, T]: params (param dtype), grads and
    AdamW m and v (float32), activations (upper bound, see the module docstring), the batch."""
    n = _sharded_elements(sizes, config)
    local = batch // (sizes[meshes.DATA] * sizes[meshes.FSDP])
    out = {
        "params": n * config.storage_dtype.itemsize,
        "grads": 4 * n,
        "adam": analytic.ADAM_MOMENTS * 4 * n,
        "activations": analytic.activation_bytes(config, local, seq),
        "batch": local * (seq + 1) * 4,
    }
    out["total"] = sum(out.values())
    return out
