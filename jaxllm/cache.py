"""KVCache: the keys and values of every layer, threaded functionally through prefill and decode.

Layout [L, B, K, S, H] (head-major: XLA_NOTES.md measured a [B, S, K, H] layout inserting
transposes on CPU). Slot s of sequence b holds the key/value of the token written there; slots below
``pad[b]`` hold left padding and are never attended to; slots at or above ``index`` are empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm.config import ModelConfig


class KVCache(struct.PyTreeNode):
    k: jax.Array  # [L, B, K, S, H] keys
    v: jax.Array  # [L, B, K, S, H] values
    index: jax.Array  # [] int32: the next slot to write; slots < index are filled
    pad: jax.Array  # [B] int32: slots < pad[b] are left padding

    @classmethod
    def init(
        cls, config: ModelConfig, batch: int, capacity: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty cache of ``capacity`` slots per sequence in ``dtype`` (default: compute dtype)."""
        if batch <= 0 or capacity <= 0:
            raise ValueError(
                f"KV cache batch and capacity must be positive, got batch={batch}, "
                f"capacity={capacity}"
            )
        shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
        dt = jnp.dtype(dtype or config.compute_dtype)
        return cls(
            k=jnp.zeros(shape, dt),
            v=jnp.zeros(shape, dt),
            index=jnp.zeros((), jnp.int32),
            pad=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        """S: slots per sequence."""
        return self.k.shape[3]

    def nbytes(self) -> int:
        """Allocated bytes of K and V (what a decode step reads when it attends over all slots)."""
        return self.k.nbytes + self.v.nbytes

    def filled_nbytes(self) -> int:
        """Bytes of K and V in the filled slots [0, index) (host-side: reads ``index``)."""
        return self.nbytes() * int(self.index) // self.capacity

    def write(self, k_new: jax.Array, v_new: jax.Array) -> KVCache:
        """Write k_new, v_new [L, B, K, T, H] at slots [index, index + T) and advance ``index``.

        XLA clamps an out-of-range slot silently, so callers check ``index + T <= capacity``
        before tracing (``jaxllm.serve`` does).
        """
        at = (0, 0, 0, self.index, 0)
        return self.replace(
            k=jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), at),
            index=self.index + k_new.shape[3],
        )
