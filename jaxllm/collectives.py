"""The communication of a sharded train step, counted two ways: in the compiled HLO and in closed form.

Sizes are logical, per device, in bytes: an all-reduce of an [n] f32 array is 4n bytes whatever the
group; an all-gather counts its (gathered) output, a reduce-scatter its (unscattered) input. The bytes a
device sends over links follow from the algorithm (a ring all-reduce sends 2(g - 1)/g of it, a ring
all-gather or reduce-scatter (g - 1)/g). Single-element operands (the loss, partial sums of the
gradient norm, a decode step's position bookkeeping) are left out of both counts: they are bytes, not
bandwidth.

What XLA does on the train step (``jaxllm.train`` on a ``jaxllm.mesh`` mesh), measured on the CPU backend
and so what ``train_comm`` counts:

- fsdp: each weight sharded on fsdp is all-gathered once (the backward reuses it: no remat); its
  gradient is all-reduced at full size, not reduce-scattered (the CPU backend does not turn
  all-reduce + slice into a reduce-scatter);
- data x fsdp: every gradient (float32, its tensor shard) is all-reduced; a tied embedding's gradient
  twice (the lookup's and the head's parts are reduced separately);
- tensor: per layer, the forward all-reduces the outputs of ``o`` and ``down`` [B', T, D], and the
  backward the input gradients of q, k and v (each separately) and of the MLP's up (and gate)
  projection, B' = B / (data x fsdp).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllm import mesh as meshes
from jaxllm.config import ModelConfig
from jaxllm.cost import call_graph
from jaxllm.model import param_shapes
from jaxllm.xla_hlo import shape_bytes

KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")
_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(KINDS) + r")\(")


def _executions(hlo_text: str) -> dict[str, int]:
    """How many times each computation runs per call of the module: a while body its trip count
    times its caller's (unknown trip counts raise), any other callee as often as its caller."""
    entry, sites = call_graph(hlo_text)
    runs: Counter[str] = Counter()

    def visit(computation: str, times: int) -> None:
        runs[computation] += times
        for site in sites.get(computation, []):
            if site.opcode == "while":
                if site.trip_count is None:
                    raise ValueError("a while loop without a known trip count: cannot count")
                cond, body = site.callees
                visit(body, times * site.trip_count)
                visit(cond, times * (site.trip_count + 1))
            else:
                for callee in site.callees:
                    visit(callee, times)

    visit(entry, 1)
    return dict(runs)


def hlo_collectives(hlo_text: str) -> dict[str, int]:
    """Logical bytes per device of each collective kind in an optimized HLO module, loops
    multiplied out (a reduce-scatter counts its input: its output times the group)."""
    runs = _executions(hlo_text)
    out = dict.fromkeys(KINDS, 0)
    current = ""
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            continue
        op = _OP.match(line)
        if op is None:
            continue
        types, kind = op.groups()
        nbytes = shape_bytes(types, min_elements=2)  # scalars carry no payload
        if kind == "reduce-scatter":
            nbytes *= _group_size(line)
        out[kind] += nbytes * runs.get(current, 0)
    return out


def _group_size(line: str) -> int:
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
    if groups:
        return len(groups.group(1).split(","))
    if iota:
        return int(iota.group(1))
    raise ValueError(f"cannot read the replica groups of: {line.strip()[:200]}")


def _tensor_factor(spec: Any, sizes: dict[str, int]) -> int:
    """How many ways the tensor axis splits a parameter with ``spec``."""
    return sizes[meshes.TENSOR] if meshes.TENSOR in tuple(spec) else 1


@dataclasses.dataclass(frozen=True)
class Collective:
    """One family of collectives in a step: its kind, logical bytes per device, and group size."""

    kind: str
    bytes: int
    group: int

    @property
    def link_bytes(self) -> float:
        """Bytes each device sends in one direction under a ring algorithm: 2(g - 1)/g of an
        all-reduce, (g - 1)/g of an all-gather or reduce-scatter."""
        share = (self.group - 1) / self.group
        return (2 if self.kind == "all-reduce" else 1) * share * self.bytes


def _weights(config: ModelConfig, sizes: dict[str, int]) -> tuple[int, int]:
    """Per device: bytes of the fsdp-split weights gathered over fsdp (each its tensor shard, in the
    storage dtype), and float32 bytes of every weight's tensor shard (its gradient)."""
    shapes = param_shapes(config)
    specs = meshes.param_specs(shapes)
    leaves = zip(
        jax.tree.leaves(shapes),
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        strict=True,
    )
    gather = grads = 0
    for shape, spec in leaves:
        n = math.prod(shape.shape) // _tensor_factor(spec, sizes)
        if sizes[meshes.FSDP] > 1 and meshes.FSDP in tuple(spec):
            gather += n * shape.dtype.itemsize
        grads += 4 * n
    return gather, grads


def _tensor_all_reduces(
    config: ModelConfig, sizes: dict[str, int], rows: int, per_layer: int
) -> int:
    """Bytes of ``per_layer`` all-reduces of [B', T, D] activations per layer over tensor, where
    ``rows`` = B x T and B' = B / (data x fsdp); 0 without tensor parallelism."""
    if sizes[meshes.TENSOR] == 1:
        return 0
    local = rows // (sizes[meshes.DATA] * sizes[meshes.FSDP])
    return config.n_layers * per_layer * local * config.d_model * config.compute_dtype.itemsize


def train_collectives(
    config: ModelConfig, sizes: dict[str, int], batch: int, seq: int
) -> dict[str, Collective]:
    """The collectives of one train step on tokens [B, T] on a mesh of ``sizes``, in closed form
    (see the module docstring for what XLA does): ``gather`` (weights over fsdp), ``grads``
    (gradients over data x fsdp), ``tensor`` (activations over tensor)."""
    gather, grads = _weights(config, sizes)
    replicas = sizes[meshes.DATA] * sizes[meshes.FSDP]
    if config.tie_embeddings:
        grads += 4 * config.vocab_size * config.d_model
    per_layer = 2 + 3 + (2 if config.mlp == "swiglu" else 1)
    tensor = _tensor_all_reduces(config, sizes, batch * seq, per_layer)
    return {
        "gather": Collective("all-gather", gather, sizes[meshes.FSDP]),
        "grads": Collective("all-reduce", grads if replicas > 1 else 0, replicas),
        "tensor": Collective("all-reduce", tensor, sizes[meshes.TENSOR]),
    }


def serve_collectives(
    config: ModelConfig, sizes: dict[str, int], batch: int, tokens: int, kv_dtype: Any
) -> dict[str, Collective]:
    """The collectives of a prefill of [B, T] tokens (``tokens`` = T) or a decode step (1) on a mesh
    of ``sizes`` (``config``: the served one, cache in ``kv_dtype``), in closed form, as XLA's CPU
    backend compiles ``jaxllm.serve``'s phases:

    - ``gather``: each fsdp-split weight all-gathered once (``serve`` gathers them where used);
    - ``tensor``: the outputs of ``o`` and ``down`` [B', T, D] all-reduced in every layer;
    - ``heads`` (decode only): the attention output [B', N, H] all-gathered over tensor in every
      layer before ``o`` (merging the K and G axes of a single token loses the split over K, so o
      then runs on every head and its all-reduce adds the copies up).

    The KV cache is split like the heads that read it: reading it needs no collective."""
    gather, _ = _weights(config, sizes)
    tensor = _tensor_all_reduces(config, sizes, batch * tokens, 2)
    heads = 0
    if tokens == 1 and sizes[meshes.TENSOR] > 1:
        local = batch // (sizes[meshes.DATA] * sizes[meshes.FSDP])
        heads = (
            config.n_layers
            * local
            * config.n_heads
            * config.head_dim
            * jnp.dtype(kv_dtype).itemsize
        )
    return {
        "gather": Collective("all-gather", gather, sizes[meshes.FSDP]),
        "tensor": Collective("all-reduce", tensor, sizes[meshes.TENSOR]),
        "heads": Collective("all-gather", heads, sizes[meshes.TENSOR]),
    }


def by_kind(families: dict[str, Collective]) -> dict[str, int]:
    """Closed-form families summed by kind: what ``hlo_collectives`` reads off a compiled program."""
    out = dict.fromkeys(KINDS, 0)
    for c in families.values():
        out[c.kind] += c.bytes
    return out


def train_comm(config: ModelConfig, sizes: dict[str, int], batch: int, seq: int) -> dict[str, int]:
    """``train_collectives`` summed by kind: what ``hlo_collectives`` reads off the compiled step."""
    return by_kind(train_collectives(config, sizes, batch, seq))
