"""A cost model of one engine step: its work from the closed-form counts, its time on the roofline.

A step runs N = B·decode + P·C tokens through the weights (``jaxllm.step``), the head at R = B·decode
+ P rows, and attention of each token over what it reads. Two counts of FLOPs (matmuls only, as
``jaxllm.analytic``):

- ``executed``: what the static-shape program computes — every slot's decode token, live or idle,
  against all S positions of its slot plus itself; every lane's C tokens, real or padding, against
  the S positions of its slot (when it reads them) and the C of its lane;
- ``useful``: what the requests needed — live decode tokens against their filled positions plus
  themselves, real prompt tokens causally against their request's earlier tokens.

Bytes are the compulsory traffic of the executed program: every weight once, the K and V of each
slot row it reads (B rows for the decode segment, one per reading lane), the K and V it writes, and
float32 logits out. Predicted seconds: max(FLOPs / peak, bytes / bandwidth), the roofline's bound.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxllm import analytic
from jaxllm.config import ModelConfig
from jaxllm.engine import StepRecord
from jaxllm.roofline import roofline


@dataclasses.dataclass(frozen=True)
class StepWork:
    executed_flops: int
    useful_flops: int
    bytes: int  # compulsory traffic of the executed program
    tokens: int  # N: tokens through the weights (padding and idle slots included)
    useful_tokens: int  # live decode tokens + real prompt tokens


def step_work(
    config: ModelConfig, record: StepRecord, slots: int, capacity: int, kv_dtype: jnp.dtype
) -> StepWork:
    """The closed-form work of the step ``record`` describes, on ``slots`` slots of ``capacity``."""
    B = slots if record.decode else 0
    P, C, S = record.lanes, record.chunk, capacity
    head = 2 * config.d_model * config.vocab_size
    body = analytic.matmul_flops_per_token(config) - head
    N, R = B + P * C, B + P
    lane_keys = (S if record.read else 0) + C
    executed_pairs = B * (S + 1) + P * C * lane_keys
    real = sum(n for _, n in record.chunks)
    useful_pairs = sum(f + 1 for f in record.live) + sum(
        s * n + n * (n + 1) // 2 for s, n in record.chunks
    )
    useful_rows = len(record.live) + len(record.chunks)
    attention = analytic.attention_flops(config, 1, 1, 1)  # per (query, key) pair
    rows_read = B + (P if record.read else 0)
    nbytes = (
        analytic.param_bytes(config)
        + analytic.kv_cache_bytes(config, rows_read, S, kv_dtype)
        + analytic.kv_cache_bytes(config, N, 1, kv_dtype)
        + R * config.vocab_size * 4
    )
    return StepWork(
        executed_flops=N * body + R * head + executed_pairs * attention,
        useful_flops=(len(record.live) + real) * body
        + useful_rows * head
        + useful_pairs * attention,
        bytes=nbytes,
        tokens=N,
        useful_tokens=len(record.live) + real,
    )


def predicted_seconds(work: StepWork, flops_per_s: float, bandwidth_bytes_per_s: float) -> float:
    """The roofline's lower bound on the step's time."""
    return roofline(
        work.executed_flops, work.bytes, flops_per_s, bandwidth_bytes_per_s
    ).predicted_seconds
