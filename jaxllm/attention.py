"""Attention of the model, in the letters of ``jaxllm.model`` (B, T, S, N, K, G = N / K, H).

- ``causal_attention``: a whole sequence attends to itself (training, prefill, the engine's fresh
  prefill lanes): cuDNN's fused kernel on an NVIDIA GPU in bf16/fp16, else ``chunked_causal_attention``.
- ``chunked_causal_attention``: the queries in blocks (``causal_blocks``); block [a, b) scores keys
  [0, b) only, so the masked upper triangle is mostly never computed, and each block's scores are
  small enough to stay in cache. Measured on the 2-core CPU (gpt2 shapes, f32, one layer): T=1024
  forward 59 -> 29 ms, T=256 B=4 forward and backward 74 -> 36 ms, against ``jax.nn``'s XLA path.
- ``cached_attention``: T new queries over a KV cache of S slots and their own keys.
Scores and softmax in float32; a query with no visible key (a padding row) gets uniform weights over
the keys its block scores, not NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxllm import products

LayerKV = tuple[jax.Array, jax.Array]  # ([B, K, S, H], [B, K, S, H]) keys and values of one layer
BLOCKS = 8  # query blocks of a causal pass at most (HLO size)
# Queries per block at least: smaller dots run further below the matmul peak than the masked pairs a
# bigger block scores cost. gpt2's train step (B=4, T=256: 2 blocks of 128 against 4 of 64, a 1.2x
# of the pairs), alternated in one process on the 2-core Zen 5 VM: bf16 1.415-1.424 -> 1.354-1.395 s,
# f32 2.334 -> 2.288 s; twelve layers' attention alone, forward and backward, bf16 190 -> 130 ms.
MIN_BLOCK = 128
# Added to a hidden key's score: far below any score, yet a row of hidden keys stays finite (its
# scores round to -1e30 alike: uniform weights, not NaN).
_HIDDEN = -1e30


def causal_blocks(seq: int) -> list[tuple[int, int]]:
    """The query blocks [start, stop) of a chunked causal pass over ``seq`` positions: about
    ``BLOCKS`` equal blocks of at least ``MIN_BLOCK`` queries. Block [a, b) scores (b - a) · b
    (query, key) pairs (``jaxllm.analytic`` counts them)."""
    size = max(MIN_BLOCK, -(-seq // BLOCKS))
    return [(a, min(a + size, seq)) for a in range(0, seq, size)]


def attention_mask(pad: jax.Array, offset: jax.Array | int, t: int, s: int, new: bool) -> jax.Array:
    """Which keys each query may attend to: bool [B, 1, 1, T, S].

    Row b's query t sits in slot ``offset + t`` (``offset``: one int, or [B] per row). New keys
    (``new=True``) sit in slots ``offset + s``; cached keys in slots ``s`` < ``offset``. A key is
    visible if its slot is at or after ``pad[b]`` and not after the query's slot.
    """
    off = jnp.broadcast_to(jnp.asarray(offset), pad.shape)[:, None, None]  # [B, 1, 1]
    q_slot = off + jnp.arange(t)[None, :, None]  # [B, T, 1]
    k_slot = (off if new else 0) + jnp.arange(s)[None, None, :]  # [B or 1, 1, S]
    visible = k_slot <= q_slot if new else jnp.broadcast_to(k_slot < off, (pad.shape[0], t, s))
    unpadded = k_slot >= pad[:, None, None]  # [B, 1, S]
    return (visible & unpadded)[:, None, None, :, :]


_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_implementation(dtype: jnp.dtype, head_dim: int) -> Literal["cudnn", "xla"]:
    """``jax.nn.dot_product_attention``'s implementation for this device, dtype and head dim H.

    "cudnn" (the fused flash kernel: no [T, S] scores in memory, the causal half skipped) on an NVIDIA
    GPU for bf16/fp16 with H a multiple of 8 up to 128; "xla" (scores materialised) elsewhere. The
    default (None) is XLA's in jax 0.10, even on a GPU, so the choice is made here.
    """
    on_cuda = jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version
    fits = jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if on_cuda and fits else "xla"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, pad: jax.Array | None) -> jax.Array:
    """Causal self-attention of a whole sequence: q [B, T, N, H], k and v [B, T, K, H] (N a multiple
    of K: grouped queries share a key head) -> [B, T, N, H], scores scaled by 1/sqrt(H). Keys in
    columns below ``pad[b]`` (left padding; None: none) are hidden. cuDNN's fused kernel where
    ``attention_implementation`` picks it, else ``chunked_causal_attention``."""
    if attention_implementation(q.dtype, q.shape[-1]) == "cudnn":
        try:
            return _fused_attention(q, k, v, pad)
        except (NotImplementedError, RuntimeError):  # cuDNN missing, or this shape unsupported
            pass
    return chunked_causal_attention(q, k, v, pad)


def _fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, pad: jax.Array | None) -> jax.Array:
    T = q.shape[1]
    mask = None
    if pad is not None:
        mask = jnp.broadcast_to(
            jnp.arange(T)[None, None, None, :] >= pad[:, None, None, None], (pad.shape[0], 1, T, T)
        )
    # jax.nn's attention mixes bf16 inputs with f32 logits inside: standard promotion, as for norms.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation="cudnn"
        )


def chunked_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, pad: jax.Array | None
) -> jax.Array:
    """``causal_attention`` block by block (``causal_blocks``), with XLA's dots: [B, T, N, H].

    Each block's scores [B, K, G, b - a, b] are float32; the softmax is normalised after the
    product with the values (one division of [.., H] instead of [.., b]). Narrow operands are
    widened to float32 for the dots where ``jaxllm.products.widens_products`` says so (the same
    products: the weights are rounded to the narrow dtype first)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    dtype = q.dtype
    work = jnp.float32 if products.widens_products(dtype) else dtype  # the dots' operands
    scale = jnp.asarray(1.0 / math.sqrt(H), dtype)
    q = (q * scale).astype(work).reshape(B, T, K, N // K, H)
    q = q.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    k, v = (a.astype(work).transpose(0, 2, 1, 3) for a in (k, v))  # [B, K, T, H]
    first = jnp.zeros((B,), jnp.int32) if pad is None else pad
    outs = []
    einsum = products.float32_einsum  # narrow operands keep the backward's products narrow
    for a, b in causal_blocks(T):
        scores = einsum("BKGTH,BKSH->BKGTS", q[:, :, :, a:b], k[:, :, :b])
        # Hidden keys by an additive bias (a where() would keep a per-head mask for the backward).
        visible = attention_mask(first, 0, b, b, new=True)[:, :, :, a:]  # [B, 1, 1, b - a, b]
        scores = scores + jnp.where(visible, 0.0, _HIDDEN)
        top = jnp.max(jax.lax.stop_gradient(scores), axis=-1, keepdims=True)
        weights = jnp.exp(scores - top)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = einsum("BKGTS,BKSH->BKGTH", weights.astype(dtype).astype(work), v[:, :, :b])
        outs.append(normalise(out, total).astype(dtype))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


@jax.custom_vjp
def normalise(out: jax.Array, total: jax.Array) -> jax.Array:
    """A block's unnormalised output over its softmax's row sums: out [..., T, H] / total [..., T, 1].

    Its own backward forms the row sums of the cotangent times ``out`` over H as a product
    (``einsum``). Autodiff's reduction instead started a YNNPACK fusion on XLA:CPU that took in
    the whole [T, S] pass after it (the scores' gradient), at about 8 GB/s: 2 ms a block for gpt2
    at B=4, T=256, against 0.26 ms for the same work split (Zen 5 VM). Twelve layers' attention,
    forward and backward, 134 -> 103-108 ms; the bf16 train step, alternated in one process, 1.307
    -> 1.266 s (faster in 11 of 12 rounds)."""
    return out / total


def _normalise_fwd(out: jax.Array, total: jax.Array) -> tuple[jax.Array, tuple]:
    return out / total, (out, total)


def _normalise_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    out, total = res
    inv = 1.0 / total
    d_total = -jnp.einsum("...h,...h->...", g, out)[..., None] * (inv * inv)
    return g * inv, d_total


normalise.defvjp(_normalise_fwd, _normalise_bwd)


def cached_attention(
    q: jax.Array,  # [B, T, N, H]
    k_new: jax.Array,  # [B, K, T, H]
    v_new: jax.Array,  # [B, K, T, H]
    kv: LayerKV,  # ([B, K, S, H], [B, K, S, H]) read only
    pad: jax.Array,  # [B]
    offset: jax.Array | int,  # one int, or [B] per row
) -> jax.Array:
    """Attention of T new queries (slots ``offset + t``) to the S cached slots and to each other:
    [B, T, N, H], computed in the cache's dtype (``jaxllm.cache.cache_dtype``). Scores are computed
    block by block (cache, new) so the cache is never concatenated (a copy); the softmax runs in
    float32 over both blocks."""
    B, T, N, H = q.shape
    K = k_new.shape[1]
    k_old, v_old = kv
    dtype = k_old.dtype
    q = q.astype(dtype).reshape(B, T, K, N // K, H) * jnp.asarray(1.0 / math.sqrt(H), dtype)
    k_new, v_new = k_new.astype(dtype), v_new.astype(dtype)
    scores = [
        jnp.einsum("BTKGH,BKSH->BKGTS", q, k_old),
        jnp.einsum("BTKGH,BKSH->BKGTS", q, k_new),
    ]
    masks = [
        attention_mask(pad, offset, T, k_old.shape[2], new=False),
        attention_mask(pad, offset, T, T, new=True),
    ]
    logits = jnp.concatenate(scores, axis=-1).astype(jnp.float32)
    # A fully masked row (a padding query) gets uniform weights rather than NaN.
    logits = jnp.where(jnp.concatenate(masks, axis=-1), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    S = k_old.shape[2]
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., :S], v_old)
    out = out + jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., S:], v_new)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
