"""The decode attention variants that ``scripts/gpu_profile.py`` times on a GPU compute the shipped
attention (``jaxllm.attention.cached_attention``): rows left-padded by 0, 2 and 4 slots, slots past
the new token's filled with noise that must not be read. On a CPU the fused kernels run as stand-ins
(cuDNN's as ``jax.nn.dot_product_attention``'s XLA implementation, Pallas's in its interpreter); on a
GPU as themselves (cuDNN only in bf16, the dtypes it takes)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import cached_attention

ON_GPU = jax.default_backend() == "gpu"
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 0.03}


def _gpu_profile():
    path = Path(__file__).parents[1] / "scripts" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_profile = _gpu_profile()


def _case(dtype, B: int, N: int, K: int, H: int, S: int, T: int = 1):
    """q [B, T, N, H], new keys and values [B, K, T, H], a cache [B, K, S, H] of noise, pads and
    the write offset (the new tokens end 7 slots short of S)."""
    keys = jax.random.split(jax.random.key(S + N), 5)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k_new, v_new = (jax.random.normal(k, (B, K, T, H)) for k in keys[1:3])
    kv = tuple(jax.random.normal(k, (B, K, S, H)).astype(dtype) for k in keys[3:])
    pad = jnp.array([0, 2, 4][:B], jnp.int32)
    return q, k_new, v_new, kv, pad, S - 6 - T


SHAPES = [(3, 8, 2, 16, 64), (2, 4, 4, 32, 128), (1, 32, 8, 64, 1024)]  # GQA, MHA, llama3.2-1b's


def _close(variant, args, dtype) -> None:
    want = np.asarray(cached_attention(*args), np.float32)
    got = np.asarray(jax.jit(variant, static_argnums=5)(*args), np.float32)  # offset static
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.standard_promotion  # the kernel's mask adds a bool to floats
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_pallas_flash_decoding_is_the_shipped_attention(dtype, shape):
    attention = lambda *a: gpu_profile.pallas_attention(*a, interpret=not ON_GPU)  # noqa: E731
    _close(attention, _case(dtype, *shape), dtype)


@pytest.mark.standard_promotion  # jax.nn.dot_product_attention's bf16 softmax mixes in float32
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_fused_attention_over_the_written_cache_is_the_shipped_attention(dtype, T):
    if ON_GPU and dtype == jnp.float32:
        pytest.skip("cuDNN's fused attention takes bf16 or fp16")
    implementation = "cudnn" if ON_GPU else "xla"
    attention = lambda *a: gpu_profile.cudnn_attention(*a, implementation=implementation)  # noqa: E731
    _close(attention, _case(dtype, *SHAPES[0], T=T), dtype)


@pytest.mark.parametrize("variant", ["written_attention", "split_softmax_attention"])
@pytest.mark.parametrize("T", [1, 3])
def test_unfused_variants_are_the_shipped_attention(variant, T):
    _close(getattr(gpu_profile, variant), _case(jnp.float32, *SHAPES[0], T=T), jnp.float32)


def test_pallas_refuses_what_its_kernel_cannot_split():
    q, k_new, v_new, kv, pad, offset = _case(jnp.float32, *SHAPES[0], T=2)
    with pytest.raises(ValueError, match="T=2"):
        gpu_profile.pallas_attention(q, k_new, v_new, kv, pad, offset, interpret=True)
    with pytest.raises(ValueError, match="got 96"):
        gpu_profile._splits(96)
