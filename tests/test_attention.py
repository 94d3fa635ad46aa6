"""The blocked causal pass against jax.nn's reference attention, past one block (T > 64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import (
    attention_implementation,
    causal_blocks,
    chunked_causal_attention,
    normalise,
)

B, T, N, K, H = 2, 200, 4, 2, 16


def _reference(q, k, v, pad):
    mask = jnp.arange(T)[None, None, None, :] >= pad[:, None, None, None]
    mask = jnp.broadcast_to(mask, (B, 1, T, T))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


def _inputs():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H))
    k, v = jax.random.normal(kk, (B, T, K, H)), jax.random.normal(kv, (B, T, K, H))
    return q, k, v, jnp.array([0, 70], jnp.int32)  # row 1: 70 columns of left padding


def test_blocks_cover_the_sequence_in_order():
    assert causal_blocks(10) == [(0, 10)]
    assert causal_blocks(200) == [(0, 128), (128, 200)]
    assert causal_blocks(1024) == [(a, a + 128) for a in range(0, 1024, 128)]
    assert causal_blocks(2048) == [(a, a + 256) for a in range(0, 2048, 256)]


def test_blocked_pass_equals_the_reference_on_real_rows():
    q, k, v, pad = _inputs()
    got, want = chunked_causal_attention(q, k, v, pad), _reference(q, k, v, pad)
    real = np.arange(T)[None, :] >= np.asarray(pad)[:, None]  # [B, T]: queries with a visible key
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6)


def test_blocked_pass_gradients_equal_the_reference():
    q, k, v, pad = _inputs()
    real = (jnp.arange(T)[None, :] >= pad[:, None])[:, :, None, None]
    w = jax.random.normal(jax.random.key(1), (B, T, N, H))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v, pad) * w, 0.0))

    got = jax.grad(loss(chunked_causal_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5)


def test_normalise_and_its_gradients_are_the_division():
    out = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
    total = jnp.exp(jax.random.normal(jax.random.key(1), (2, 3, 5, 1)))
    g = jax.random.normal(jax.random.key(2), out.shape)
    got, pull = jax.vjp(normalise, out, total)
    want, pull_ref = jax.vjp(lambda o, t: o / t, out, total)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    for a, b in zip(pull(g), pull_ref(g), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_query_with_no_visible_key_averages_its_blocks_values():
    """A padding row is finite: uniform weights over the keys its block scores, not NaN."""
    q, k, v, pad = _inputs()
    out = chunked_causal_attention(q, k, v, pad)
    assert bool(jnp.all(jnp.isfinite(out)))
    G = N // K
    np.testing.assert_allclose(  # row 1, query 65 (block [64, 128)): the mean of its 128 keys
        np.asarray(out[1, 65]), np.repeat(np.asarray(v[1, :128].mean(axis=0)), G, axis=0), atol=1e-5
    )


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_blocked_pass_in_a_narrow_dtype_keeps_its_dtype_and_accuracy(dtype):
    q, k, v, pad = _inputs()
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    got = chunked_causal_attention(q, k, v, pad)
    assert got.dtype == jnp.dtype(dtype)
    real = np.arange(T)[None, :] >= np.asarray(pad)[:, None]
    want = np.asarray(_reference(*_inputs()))[real]
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32))[real], want, atol=0.05)


def test_attention_implementation_follows_device_dtype_and_head_dim():
    """cuDNN's fused kernel only where it applies (an NVIDIA GPU, bf16/fp16, H % 8 == 0, H <= 128)."""
    cuda = jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version
    assert attention_implementation(jnp.dtype(jnp.float32), 64) == "xla"
    assert attention_implementation(jnp.dtype(jnp.bfloat16), 64) == ("cudnn" if cuda else "xla")
    assert attention_implementation(jnp.dtype(jnp.bfloat16), 60) == "xla"
    assert attention_implementation(jnp.dtype(jnp.float16), 256) == "xla"
