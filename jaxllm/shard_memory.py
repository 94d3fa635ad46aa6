"""Closed-form bytes per device of a train step, a prefill and a decode step on a mesh: each array
divided as the partition rules (``jaxllm.mesh``) split it.

- Parameters and AdamW's m and v are divided by the mesh axes their rule names (fsdp and tensor;
  replicated on data); the batch [B, T+1] by data x fsdp.
- Activations are counted at the per-device batch B / (data x fsdp), with what belongs to one head
  or one MLP column divided by tensor and the [B, T, D] tensors around it replicated
  (``jaxllm.analytic.activation_bytes`` with ``tensor``).
- Under fsdp a device also holds every weight gathered over fsdp (``gathered``: the step gathers
  each once and the backward reuses it, ``jaxllm.collectives``), and the gradient of those gathered
  weights from its own batch rows: float32 at the gathered size before it is reduced (the CPU
  backend all-reduces it at full size and keeps its shard; a reduce-scatter would still start from
  it). Without fsdp, both are the parameters' own sizes and ``gathered`` is 0.
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
    """Parameter elements one device holds on a mesh of ``sizes``."""
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
    """Bytes one device holds in a train step on tokens [B, T] (see the module docstring): params
    (param dtype), grads (float32, at the fsdp-gathered size), AdamW m and v (float32), activations,
    the batch, and the weights gathered over fsdp (param dtype; 0 without fsdp)."""
    n = _sharded_elements(sizes, config)
    fsdp = sizes[meshes.FSDP]
    gathered = _sharded_elements(sizes | {meshes.FSDP: 1}, config)
    local = batch // (sizes[meshes.DATA] * fsdp)
    out = {
        "params": n * config.storage_dtype.itemsize,
        "grads": 4 * gathered,
        "adam": analytic.ADAM_MOMENTS * 4 * n,
        "activations": analytic.activation_bytes(config, local, seq, sizes[meshes.TENSOR]),
        "batch": local * (seq + 1) * 4,
        "gathered": gathered * config.storage_dtype.itemsize if fsdp > 1 else 0,
    }
    out["total"] = sum(out.values())
    return out


def serve_memory_per_device(
    config: ModelConfig,
    sizes: dict[str, int],
    batch: int,
    tokens: int,
    capacity: int,
    kv_dtype: Any,
) -> dict[str, int]:
    """Bytes one device holds as the arguments of a sharded prefill of [B, T] tokens (``tokens`` =
    T) or decode step (1) over a KV cache of B x ``capacity`` slots in ``kv_dtype`` (``config``: the
    served one, ``jaxllm.serve.serving_config``): its parameters' share, its share of the cache (B
    split over data x fsdp, K over tensor), and its rows of the int32 tokens and padding, plus the
    cache's int32 write index."""
    local = batch // (sizes[meshes.DATA] * sizes[meshes.FSDP])
    kv = analytic.kv_cache_bytes(config, local, capacity, kv_dtype)
    out = {
        "params": _sharded_elements(sizes, config) * config.storage_dtype.itemsize,
        "kv_cache": kv // sizes[meshes.TENSOR],
        "inputs": 4 * local * (tokens + 1) + 4,
    }
    out["total"] = sum(out.values())
    return out
