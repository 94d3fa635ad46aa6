"""KVCache: the keys and values of every layer, threaded functionally through prefill and decode of
one left-padded batch (``jaxllm.generate``; the engine's per-request slots are ``jaxllm.slots``).

Layout: one array per layer, head-major [B, K, S, H] (a tuple of L). One layout for every serving path:
a layer's own array is read in place and, donated, updated in place, while a slice of a stacked
[L, B, K, S, H] cache is materialised as a copy on CPU (of the whole cache, per step). Serving runs
unrolled layers (``serve.serving_config``), so nothing needs the stacked layout. A [B, S, K, H] layout
made XLA insert transposes on CPU (measured in round 1). Slot s of sequence b holds the key/value of
the token written there; slots below ``pad[b]`` hold left padding and are never attended to; slots at
or above ``index`` are empty.

A decode step reads every slot of the cache, filled or not: a cache sized to what a generation
needs reads less. ``resize`` cuts or extends the slots (a copy, once), which ``jaxllm.generate`` does
to grow its cache in powers of two; reading a part of a bigger cache instead would copy that part on
every step (XLA's dots on a CPU take whole arrays: measured at B=32, a 128-slot read out of 1024
slots doubled gpt2's step). A prefill reads no cache at all (``jaxllm.serve``): its tokens attend to
each other only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm.attention import cached_attention
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import Attend


def cache_dtype(config: ModelConfig) -> jnp.dtype:
    """The dtype a cache stores K and V in by default: the compute dtype, except float32 on a CPU
    when computing in 16 bits.

    XLA's CPU backend upcasts the whole operand of a batched bf16 dot (attention over the cache) on
    every call: measured on the 2-core development machine, one gpt2 layer's decode attention at B=32
    over 1024 slots took 164 ms with a bf16 cache and 17 ms with a float32 one, though it reads half
    the bytes. Elsewhere (GPUs) the cache is kept in the compute dtype.
    """
    dtype = config.compute_dtype
    if dtype.itemsize < 4 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype


class KVCache(struct.PyTreeNode):
    k: tuple[jax.Array, ...]  # keys: L arrays [B, K, S, H]
    v: tuple[jax.Array, ...]  # values, laid out like k
    index: jax.Array  # [] int32: the next slot to write; slots < index are filled
    pad: jax.Array  # [B] int32: slots < pad[b] are left padding

    @classmethod
    def init(
        cls, config: ModelConfig, batch: int, capacity: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty cache of ``capacity`` slots per sequence in ``dtype`` (default:
        ``cache_dtype(config)``)."""
        if batch <= 0 or capacity <= 0:
            raise InputError(
                f"KV cache batch and capacity must be positive, got batch={batch}, "
                f"capacity={capacity}"
            )
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        dt = jnp.dtype(dtype or cache_dtype(config))

        def zeros() -> tuple[jax.Array, ...]:
            return tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers))

        return cls(
            k=zeros(),
            v=zeros(),
            index=jnp.zeros((), jnp.int32),
            pad=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """[B, K, S, H] of one layer."""
        return tuple(self.k[0].shape)

    @property
    def batch(self) -> int:
        return self.layer_shape[0]

    @property
    def capacity(self) -> int:
        """S: slots per sequence."""
        return self.layer_shape[2]

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, K, S, H] of layer i."""
        return self.k[i], self.v[i]

    def resize(self, capacity: int) -> KVCache:
        """The cache with ``capacity`` slots: its first slots kept, empty ones appended (a copy).
        Callers keep the filled slots: ``index <= capacity``."""

        def fit(x: jax.Array) -> jax.Array:
            extra = capacity - x.shape[2]
            return (
                x[:, :, :capacity]
                if extra <= 0
                else jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))
            )

        return self.replace(k=tuple(map(fit, self.k)), v=tuple(map(fit, self.v)))

    def attend(self, i: int) -> Attend:
        """Layer i's attention for new tokens at slots ``index + t``: to the cache's filled, unpadded
        slots and causally to each other (``attention.cached_attention``)."""
        return functools.partial(
            cached_attention, kv=self.layer(i), pad=self.pad, offset=self.index
        )

    def nbytes(self) -> int:
        """Allocated bytes of K and V (what a decode step reads when it attends over all slots)."""
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))

    def check_built_for(self, config: ModelConfig) -> None:
        """ValueError unless this cache has ``config``'s layers, key/value heads and head width and a
        write index in [0, capacity] (host-side: reads ``index``; call it before tracing)."""
        _, heads, _, width = self.layer_shape
        built = (len(self.k), heads, width)
        wanted = (config.n_layers, config.n_kv_heads, config.head_dim)
        if built != wanted:
            raise InputError(
                f"the KV cache has (layers, kv heads, head dim) = {built}, the model {wanted}"
            )
        if not 0 <= int(self.index) <= self.capacity:
            raise InputError(
                f"the KV cache index {int(self.index)} is outside [0, {self.capacity}]"
            )

    def check_room(self, new_tokens: int, max_len: int) -> int:
        """Raise ValueError unless ``new_tokens`` more slots fit; return the current index.

        Host-side (reads ``index``; call it before tracing): the write must end at or before both the
        capacity and ``max_len``, the model's context (slot s holds a position <= s).
        """
        index = int(self.index)
        end = index + new_tokens
        if end > self.capacity:
            raise InputError(
                f"KV cache overflow: {new_tokens} new token(s) at index {index} need {end} slots, "
                f"capacity is {self.capacity}"
            )
        if end > max_len:
            raise InputError(
                f"context overflow: {new_tokens} new token(s) at index {index} reach position "
                f"{end - 1}, the model's context (max_len) is {max_len}"
            )
        return index

    def write(self, k_new: jax.Array, v_new: jax.Array) -> KVCache:
        """Write k_new, v_new [L, B, K, T, H] at slots [index, index + T) and advance ``index``.

        XLA clamps an out-of-range slot silently, so callers check ``index + T <= capacity``
        before tracing (``jaxllm.serve`` does).
        """
        at = (0, 0, self.index, 0)

        def put(old: jax.Array, new: jax.Array) -> jax.Array:
            with jax.named_scope("kv_cache"):  # its ops' names, for ``jaxllm profile``
                return jax.lax.dynamic_update_slice(old, new.astype(old.dtype), at)

        return self.replace(
            k=tuple(put(o, n) for o, n in zip(self.k, k_new, strict=True)),
            v=tuple(put(o, n) for o, n in zip(self.v, v_new, strict=True)),
            index=self.index + k_new.shape[3],
        )
