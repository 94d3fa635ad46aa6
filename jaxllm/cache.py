"""KVCache: the keys and values of every layer, threaded functionally through prefill and decode.

Layout: head-major [B, K, S, H] per layer (XLA_NOTES.md measured a [B, S, K, H] layout inserting
transposes on CPU). For a model with scanned layers (``config.scan_layers``) the layers are stacked into
one [L, B, K, S, H] array, which ``nn.scan`` slices; for unrolled layers each layer has its own array
(a tuple of L arrays), because on CPU XLA materialises a slice of a stacked cache as a copy (of the whole
cache, per step) while a layer's own array is read in place and updated in place when donated. Slot s of sequence b holds the key/value of the token written there; slots below
``pad[b]`` hold left padding and are never attended to; slots at or above ``index`` are empty.

``window`` (static: part of the pytree structure, so each value compiles once) bounds the slots that new
tokens attend to: a pass reads only slots [0, window) of the cache (None: every slot), so a decode step
over a short context need not read the whole allocated cache. Slicing the window out of a bigger cache
is a copy on CPU, so it pays when the window is a small part of the capacity (``jaxllm.serve`` grows it
in powers of two).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm.config import ModelConfig

LayerArrays = jax.Array | tuple[jax.Array, ...]  # [L, B, K, S, H], or L arrays [B, K, S, H]


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
    k: LayerArrays  # keys: stacked [L, B, K, S, H] (scanned layers) or L arrays [B, K, S, H]
    v: LayerArrays  # values, laid out like k
    index: jax.Array  # [] int32: the next slot to write; slots < index are filled
    pad: jax.Array  # [B] int32: slots < pad[b] are left padding
    window: int | None = struct.field(pytree_node=False, default=None)  # slots read; None: all

    @classmethod
    def init(
        cls, config: ModelConfig, batch: int, capacity: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty cache of ``capacity`` slots per sequence in ``dtype`` (default:
        ``cache_dtype(config)``), stacked when ``config.scan_layers``, one array per layer otherwise."""
        if batch <= 0 or capacity <= 0:
            raise ValueError(
                f"KV cache batch and capacity must be positive, got batch={batch}, "
                f"capacity={capacity}"
            )
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        dt = jnp.dtype(dtype or cache_dtype(config))

        def zeros() -> LayerArrays:
            if config.scan_layers:
                return jnp.zeros((config.n_layers, *shape), dt)
            return tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers))

        return cls(
            k=zeros(),
            v=zeros(),
            index=jnp.zeros((), jnp.int32),
            pad=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def stacked(self) -> bool:
        """True for the [L, B, K, S, H] layout, False for one array per layer."""
        return not isinstance(self.k, tuple)

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """[B, K, S, H] of one layer."""
        return tuple(self.k.shape[1:] if not isinstance(self.k, tuple) else self.k[0].shape)

    @property
    def n_layers(self) -> int:
        return len(self.k) if isinstance(self.k, tuple) else self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.layer_shape[0]

    @property
    def capacity(self) -> int:
        """S: slots per sequence."""
        return self.layer_shape[2]

    @property
    def attended(self) -> int:
        """Slots a pass reads: the window, or the capacity when there is none."""
        return self.capacity if self.window is None else min(self.window, self.capacity)

    def _read(self, x: jax.Array) -> jax.Array:
        return x if self.attended == self.capacity else x[..., : self.attended, :]

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, K, window, H] of layer i (a slice, i.e. a copy, when stacked or
        windowed)."""
        return self._read(self.k[i]), self._read(self.v[i])

    def stacked_kv(self) -> tuple[jax.Array, jax.Array]:
        """Keys and values as [L, B, K, window, H] (a copy when stored per layer or windowed)."""
        k, v = self.k, self.v
        if isinstance(k, tuple) and isinstance(v, tuple):
            k, v = jnp.stack(k), jnp.stack(v)
        return self._read(k), self._read(v)  # pyright: ignore[reportArgumentType]

    def nbytes(self) -> int:
        """Allocated bytes of K and V (what a decode step reads when it attends over all slots)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((self.k, self.v)))

    def filled_nbytes(self) -> int:
        """Bytes of K and V in the filled slots [0, index) (host-side: reads ``index``)."""
        return self.nbytes() * int(self.index) // self.capacity

    def check_built_for(self, config: ModelConfig) -> None:
        """ValueError unless this cache has ``config``'s layers, key/value heads and head width and a
        write index in [0, capacity] (host-side: reads ``index``; call it before tracing)."""
        _, heads, _, width = self.layer_shape
        built = (self.n_layers, heads, width)
        wanted = (config.n_layers, config.n_kv_heads, config.head_dim)
        if built != wanted:
            raise ValueError(
                f"the KV cache has (layers, kv heads, head dim) = {built}, the model {wanted}"
            )
        if not 0 <= int(self.index) <= self.capacity:
            raise ValueError(
                f"the KV cache index {int(self.index)} is outside [0, {self.capacity}]"
            )

    def check_room(self, new_tokens: int, max_len: int) -> int:
        """Raise ValueError unless ``new_tokens`` more slots fit; return the current index.

        Host-side (reads ``index``; call it before tracing): the write must end at or before both the
        capacity and ``max_len``, the model's context (slot s holds a position <= s), and the filled
        slots must lie inside the window.
        """
        index = int(self.index)
        if index > self.attended:
            raise ValueError(
                f"the cache window ({self.attended} slots) does not cover its {index} filled slots"
            )
        end = index + new_tokens
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {new_tokens} new token(s) at index {index} need {end} slots, "
                f"capacity is {self.capacity}"
            )
        if end > max_len:
            raise ValueError(
                f"context overflow: {new_tokens} new token(s) at index {index} reach position "
                f"{end - 1}, the model's context (max_len) is {max_len}"
            )
        return index

    def write(self, k_new: jax.Array, v_new: jax.Array) -> KVCache:
        """Write k_new, v_new [L, B, K, T, H] at slots [index, index + T) and advance ``index``.

        XLA clamps an out-of-range slot silently, so callers check ``index + T <= capacity``
        before tracing (``jaxllm.serve`` does).
        """
        return self.replace(
            k=_write(self.k, k_new, self.index),
            v=_write(self.v, v_new, self.index),
            index=self.index + k_new.shape[3],
        )


def _write(old: LayerArrays, new: jax.Array, index: jax.Array) -> LayerArrays:
    """dynamic_update_slice of new [L, B, K, T, H] at slot ``index``, in either layout."""
    if isinstance(old, tuple):
        at = (0, 0, index, 0)
        return tuple(
            jax.lax.dynamic_update_slice(o, n.astype(o.dtype), at)
            for o, n in zip(old, new, strict=True)
        )
    return jax.lax.dynamic_update_slice(old, new.astype(old.dtype), (0, 0, 0, index, 0))
