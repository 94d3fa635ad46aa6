"""Batching requests into static shapes: power-of-two buckets, and left-padding prompts into one.

Bucket policy of a left-padded batch (it bounds the compilations to O(log² max_len) per batch size and
sampler): the prompt length T is the longest prompt rounded up to a power of two, lowered if needed
(not below the longest prompt) so that T + max_new_tokens fits in max_len; the cache capacity S is
T + max_new_tokens rounded up to a power of two, at most max_len.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.serve import Prompt, check_tokens


def bucket(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    return 1 << (max(n, floor) - 1).bit_length()


def buckets(config: ModelConfig, longest: int, max_new_tokens: int) -> tuple[int, int]:
    """(T, S): the padded prompt length and the cache capacity (see the module docstring)."""
    T = max(longest, min(bucket(longest), config.max_len - max_new_tokens))
    return T, min(config.max_len, bucket(T + max_new_tokens))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Prompts left-padded into one bucket, with each row's limit of new tokens."""

    tokens: np.ndarray  # [B, T] int32, row b = pad[b] copies of token 0, then its prompt
    pad: np.ndarray  # [B] int32
    limits: np.ndarray  # [B] int32: new tokens allowed per row
    capacity: int  # S: cache slots


def make_batch(
    config: ModelConfig, prompts: Sequence[Prompt], max_new_tokens: int | Sequence[int]
) -> Batch:
    """Validate the requests and left-pad them; ValueError naming the bad value and the limit."""
    if len(prompts) == 0:
        raise InputError("no prompts given")
    rows = [check_tokens(config, p, "prompt token").reshape(-1) for p in prompts]
    limits = np.asarray(max_new_tokens)
    if not np.issubdtype(limits.dtype, np.integer) or limits.shape not in ((), (len(rows),)):
        raise InputError(
            f"max_new_tokens must be one integer or one per prompt ({len(rows)}), "
            f"got {max_new_tokens!r}"
        )
    limits = np.broadcast_to(limits, (len(rows),))
    for i, (row, limit) in enumerate(zip(rows, limits, strict=True)):
        if row.size == 0:
            raise InputError(f"prompt {i} is empty")
        if limit < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {int(limit)} for prompt {i}")
        if row.size + limit > config.max_len:
            raise InputError(
                f"prompt {i} has {row.size} tokens + max_new_tokens {int(limit)} = "
                f"{row.size + int(limit)}, beyond the model's context (max_len) {config.max_len}"
            )
    T, S = buckets(config, max(r.size for r in rows), int(limits.max()))
    tokens = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        tokens[b, T - row.size :] = row
    pad = np.array([T - r.size for r in rows], np.int32)
    return Batch(tokens, pad, limits.astype(np.int32), S)
