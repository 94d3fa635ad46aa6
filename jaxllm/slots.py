"""The serving engine's KV cache: B slots, each holding one request's keys and values.

Layout: one array [B, K, S, H] per layer (a tuple of L), head-major like ``jaxllm.cache.KVCache``'s
unrolled layout: a layer's own array is read in place and, donated, updated in place. A request
occupies one slot from position 0, so position p of its sequence sits in slot position p: no padding
and no shared index. How many positions of each slot are filled is host-side bookkeeping
(``jaxllm.engine``) passed into every step; a slot's positions at or beyond its length are garbage
that no query attends to.

Writes are scatters of single token positions with ``mode="drop"``: a write aimed at position S (the
engine's target for an idle slot's token or a chunk's padding) is dropped, never clamped onto a
filled position (XLA clamps an out-of-range ``dynamic_update_slice`` silently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm.cache import cache_dtype
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError


class SlotCache(struct.PyTreeNode):
    k: tuple[jax.Array, ...]  # L arrays [B, K, S, H]
    v: tuple[jax.Array, ...]  # laid out like k

    @classmethod
    def init(
        cls, config: ModelConfig, slots: int, capacity: int, dtype: jnp.dtype | str | None = None
    ) -> SlotCache:
        """An empty cache of ``slots`` sequences of ``capacity`` positions in ``dtype`` (default:
        ``jaxllm.cache.cache_dtype(config)``)."""
        if slots <= 0 or capacity <= 0:
            raise InputError(
                f"slot cache slots and capacity must be positive, got slots={slots}, "
                f"capacity={capacity}"
            )
        shape = (slots, config.n_kv_heads, capacity, config.head_dim)
        dt = jnp.dtype(dtype or cache_dtype(config))
        k = tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers))
        v = tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers))
        return cls(k=k, v=v)

    @property
    def slots(self) -> int:
        """B: requests the cache holds at once."""
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        """S: positions per slot."""
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        """Allocated bytes of K and V."""
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))

    def store(
        self, k_new: jax.Array, v_new: jax.Array, rows: jax.Array, positions: jax.Array
    ) -> SlotCache:
        """Write token n's keys and values (k_new, v_new [L, 1, K, N, H]) at slot ``rows[n]``,
        position ``positions[n]`` (both [N] int32); a position >= S is dropped."""

        def put(old: jax.Array, new: jax.Array) -> jax.Array:
            with jax.named_scope("kv_cache"):  # its ops' names, for ``jaxllm profile``
                values = new[0].transpose(1, 0, 2).astype(old.dtype)  # [N, K, H]
                return old.at[rows, :, positions, :].set(values, mode="drop")

        k = tuple(put(o, n) for o, n in zip(self.k, k_new, strict=True))
        v = tuple(put(o, n) for o, n in zip(self.v, v_new, strict=True))
        return self.replace(k=k, v=v)
