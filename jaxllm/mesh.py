"""The device mesh and the one table of partition rules: where every array of a phase lives.

``--mesh data=2,fsdp=2,tensor=2`` names the sizes of three mesh axes (an axis left out has size 1;
the sizes multiply to ``jax.device_count()``; without ``--mesh``, one device):

- ``data``: the batch is split across it, parameters and optimizer state are replicated (DP);
- ``fsdp``: the batch is split across it too, and parameters, gradients and AdamW moments are
  sharded along D (ZeRO-3: a weight is gathered where a matmul needs it; on the CPU backend XLA
  all-reduces its gradient rather than reduce-scattering it, see ``jaxllm.collectives``);
- ``tensor``: attention heads (N, K) and MLP columns (F) are split across it (Megatron-style tensor
  parallelism: q, k, v, up and gate column-parallel, o and down row-parallel).

``RULES`` maps a parameter's path (regex on ``embed/embedding``, ``attn/q/kernel``, ... with the layer
prefix ``blocks/`` or ``block_i/`` removed) to the axes of each of its dimensions; under ``blocks`` the
leading L axis is unsharded. Everything else is derived from it: AdamW's moments mirror the parameters,
scalars (step, counts, learning rate) are replicated, the batch [B, T+1] is split on (data, fsdp), and
a KV cache layer [B, K, S, H] on (data, fsdp) over B and ``tensor`` over K. JAX's own sharding does the
rest (``jax.jit`` with in/out shardings; GSPMD inserts the collectives).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.cache import KVCache
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import param_shapes, path_names
from jaxllm.slots import SlotCache

AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
DATA, FSDP, TENSOR = AXES
BATCH = (DATA, FSDP)  # the mesh axes the batch dimension B is split across
Spec = tuple[Any, ...]  # one entry per array dimension: a mesh axis name, a tuple of them, or None

# Parameter path (layer prefix removed) -> mesh axis of each dimension, in the model's letters.
RULES: tuple[tuple[str, Spec], ...] = (
    (r"embed/embedding", (None, FSDP)),  # [V, D]
    (r"pos_embed/embedding", (None, FSDP)),  # [max_len, D]
    (r"attn/[qkv]/kernel", (FSDP, TENSOR, None)),  # [D, N or K, H]
    (r"attn/[qkv]/bias", (TENSOR, None)),  # [N or K, H]
    (r"attn/o/kernel", (TENSOR, None, FSDP)),  # [N, H, D]
    (r"mlp/(up|gate)/kernel", (FSDP, TENSOR)),  # [D, F]
    (r"mlp/(up|gate)/bias", (TENSOR,)),  # [F]
    (r"mlp/down/kernel", (TENSOR, FSDP)),  # [F, D]
    (r"(attn/o|mlp/down)/bias", (None,)),  # [D]
    (r"\w*norm/(scale|bias)", (None,)),  # [D]
    (r"head/kernel", (FSDP, None)),  # [D, V]
)
_LAYER = re.compile(r"^(blocks|block_\d+)/")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> {data: 2, fsdp: 2, tensor: 2} (every axis, absent ones 1).

    InputError naming the bad item: an unknown or repeated axis, a size that is not a positive int.
    """
    sizes = dict.fromkeys(AXES, 1)
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in AXES or name in seen:
            what = "repeated" if name in seen else "unknown" if sep else "malformed"
            raise InputError(
                f"--mesh item {item!r} is {what}: give AXIS=SIZE with AXIS in {', '.join(AXES)}"
            )
        if not raw.strip().isdigit() or int(raw) < 1:
            raise InputError(f"--mesh axis {name} must be a positive integer, got {raw.strip()!r}")
        sizes[name] = int(raw)
        seen.add(name)
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all of them), sizes multiplying to
    their count; InputError naming the axes otherwise."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes.get(axis, 1) for axis in AXES)
    if math.prod(shape) != len(devices):
        described = " x ".join(f"{a}={n}" for a, n in zip(AXES, shape, strict=True))
        raise InputError(
            f"mesh {described} has {math.prod(shape)} devices; there are {len(devices)} "
            "(axis sizes must multiply to the device count)"
        )
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def check_divides(
    mesh: Mesh, config: ModelConfig, batch: int | None = None, batch_name: str = "batch"
) -> None:
    """InputError naming the axis and the size it does not divide: ``tensor`` must divide the query
    heads N, the key/value heads K and the MLP width F; ``fsdp`` the width D; data x fsdp the batch
    (called ``batch_name`` in the message: what the user gave)."""
    n = dict(mesh.shape)
    checks = [
        (TENSOR, n[TENSOR], "n_heads", config.n_heads),
        (TENSOR, n[TENSOR], "n_kv_heads", config.n_kv_heads),
        (TENSOR, n[TENSOR], "d_ff", config.d_ff),
        (FSDP, n[FSDP], "d_model", config.d_model),
    ]
    if batch is not None:
        checks.append(("data x fsdp", n[DATA] * n[FSDP], batch_name, batch))
    for axis, size, name, value in checks:
        if value % size:
            raise InputError(f"mesh axis {axis}={size} does not divide {name}={value}")


def param_spec(path: str, ndim: int) -> PartitionSpec | None:
    """The rule's PartitionSpec for the parameter at ``path`` with ``ndim`` dimensions (a leading L
    axis under ``blocks``); None when no rule names the path or its rank differs."""
    layered = _LAYER.match(path)
    name = _LAYER.sub("", path)
    for pattern, spec in RULES:
        if re.fullmatch(pattern, name):
            full = ((None,) if layered and layered.group(1) == "blocks" else ()) + spec
            return PartitionSpec(*full) if len(full) == ndim else None
    return None


def param_specs(params: Any) -> Any:
    """A PartitionSpec per parameter leaf; ValueError (a bug: a new parameter needs a rule) naming one no rule covers."""

    def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        name = path_names(path)
        found = param_spec(name, len(leaf.shape))
        if found is None:
            raise ValueError(f"no partition rule for parameter {name} of shape {leaf.shape}")
        return found

    return jax.tree_util.tree_map_with_path(spec, params)


def state_specs(tree: Any) -> Any:
    """A PartitionSpec per leaf of a train state or optimizer state: a leaf whose path ends in a
    parameter's path (the parameters, AdamW's m and v) follows the rules, anything else (step,
    counts, hyperparameters) is replicated."""

    def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        names = path_names(path).split("/")
        for start in range(len(names)):
            found = param_spec("/".join(names[start:]), len(leaf.shape))
            if found is not None:
                return found
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, tree)


def gather_fsdp(params: Any, mesh: Mesh) -> Any:
    """``params`` constrained to their rules without ``fsdp``: gathered over it, still split on
    ``tensor`` (call inside the differentiated function, so the gradients flow back through it)."""

    def unsharded_on_fsdp(spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*(None if a == FSDP else a for a in spec)))

    specs = param_specs(params)
    return jax.lax.with_sharding_constraint(
        params,
        jax.tree.map(unsharded_on_fsdp, specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
    )


def with_gathered_weights(fn: Any, mesh: Mesh) -> Any:
    """``fn(params, *rest)`` with ``params`` gathered over fsdp first (``gather_fsdp``): a serving
    program's weights gathered where they are used (ZeRO-3, as in training; otherwise XLA splits the
    matmuls' contraction over fsdp and all-reduces the activations instead)."""

    def gathered(params: Any, *rest: Any) -> Any:
        return fn(gather_fsdp(params, mesh), *rest)

    return gathered


def batch_spec() -> PartitionSpec:
    """Tokens [B, ...]: B split across data and fsdp."""
    return PartitionSpec(BATCH)


def cache_specs(cache: Any) -> Any:
    """A ``KVCache``'s specs: each layer's K and V [B, K, S, H] on (data, fsdp) over B and tensor
    over K; the write index replicated; the padding [B] split like B."""
    layer = PartitionSpec(BATCH, TENSOR, None, None)
    return cache.replace(
        k=tuple(layer for _ in cache.k),
        v=tuple(layer for _ in cache.v),
        index=PartitionSpec(),
        pad=PartitionSpec(BATCH),
    )


def slot_cache_specs(cache: Any) -> Any:
    """A ``SlotCache``'s specs: each layer's K and V [B, K, S, H] split on tensor over K; the slots
    are not split (the engine runs one slot set per tensor group: see ``check_engine_mesh``)."""
    layer = PartitionSpec(None, TENSOR, None, None)
    return cache.replace(k=tuple(layer for _ in cache.k), v=tuple(layer for _ in cache.v))


def check_engine_mesh(mesh: Mesh, config: ModelConfig) -> None:
    """InputError unless ``mesh`` is tensor-parallel only: an engine's requests come and go one slot
    at a time, so its slots are not split over data or fsdp (run one engine per data replica)."""
    n = dict(mesh.shape)
    for axis in (DATA, FSDP):
        if n[axis] != 1:
            raise InputError(
                f"the serving engine shards over tensor only, got mesh axis {axis}={n[axis]} "
                "(run one engine per data replica)"
            )
    check_divides(mesh, config)


@dataclasses.dataclass(frozen=True)
class ServeLayout:
    """Where the arrays of the serving phases live on a mesh (``config``: the served, unrolled one).

    ``params``: a NamedSharding per parameter (the rules); ``cache``: a ``KVCache`` of them (B on data
    and fsdp, K on tensor); ``slots``: a ``SlotCache`` of them (K on tensor); ``rows``: any [B, ...]
    array (tokens, padding, logits, limits), B split like the cache; ``replicated``: everything else
    (a random key, stop tokens, step counts, an engine step's inputs and logits)."""

    params: Any
    cache: KVCache
    slots: SlotCache
    rows: NamedSharding
    replicated: NamedSharding

    @classmethod
    @functools.cache  # param_shapes traces the model's init: once per (mesh, config)
    def of(cls, mesh: Mesh, config: ModelConfig) -> ServeLayout:
        if config.kernel_order != "in_out":  # the rules name in_out kernels' axes
            raise ValueError(f"a mesh serves in_out kernels, not {config.kernel_order!r}")
        named = functools.partial(shardings, mesh)
        cache = jax.eval_shape(lambda: KVCache.init(config, 1, 1))
        return cls(
            params=named(param_specs(param_shapes(config))),
            cache=named(cache_specs(cache)),
            slots=named(slot_cache_specs(jax.eval_shape(lambda: SlotCache.init(config, 1, 1)))),
            rows=NamedSharding(mesh, batch_spec()),
            replicated=replicated(mesh),
        )


def shardings(mesh: Mesh, specs: Any) -> Any:
    """NamedShardings on ``mesh`` for a tree of PartitionSpecs."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
