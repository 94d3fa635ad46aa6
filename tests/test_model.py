import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from jaxllm.cache import KVCache
from jaxllm.config import PRESETS, ModelConfig
from jaxllm.model import (
    Transformer,
    count_params,
    output_major,
    param_shapes,
    stack_layers,
    unstack_layers,
)
from jaxllm.model import init_params as _init_params

# (family, K) for multi-head (K = N = 4), grouped-query (K = 2) and multi-query (K = 1) attention.
# Every family x K (N = 4: multi-head, grouped-query, multi-query); the fast suite runs one of each
# attention kind and each family, the rest are slow.
FAST = {("gpt2", 4), ("gpt2", 1), ("llama", 2)}
VARIANTS = [
    pytest.param(fam, k, marks=[] if (fam, k) in FAST else [pytest.mark.slow])
    for fam in ("gpt2", "llama")
    for k in (4, 2, 1)
]


@functools.cache
def _cached_init(cfg: ModelConfig):
    return _init_params(cfg, jax.random.key(0))


def init_params(cfg: ModelConfig, key: jax.Array):
    """Parameters shared by every test of the same config (initialising compiles for seconds)."""
    del key
    return _cached_init(cfg.replace(scan_layers=True, remat="none"))


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens, pad=None, positions=None):
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, pad=pad)
    return logits


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("llama2-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
        ("llama3.2-1b", 1_235_814_400),
    ],
)
def test_parameter_counts_match_published(name, published):
    assert count_params(PRESETS[name])["total"] == published


def test_count_matches_allocated_params(key):
    cfg = tiny("llama", 2)
    params = _init_params(cfg, key)
    assert count_params(cfg)["total"] == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize(("family", "n_kv_heads"), VARIANTS)
def test_variants_have_right_shapes(family, n_kv_heads, key):
    cfg = tiny(family, n_kv_heads)
    params = init_params(cfg, key)
    attn = params["blocks"]["attn"]
    H = cfg.head_dim
    assert attn["q"]["kernel"].shape == (cfg.n_layers, cfg.d_model, cfg.n_heads, H)
    assert attn["k"]["kernel"].shape == (cfg.n_layers, cfg.d_model, n_kv_heads, H)
    tokens = jax.random.randint(key, (3, 7), 0, cfg.vocab_size)
    logits = forward(cfg, params, tokens)
    assert logits.shape == (3, 7, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scanned_and_unrolled_layers_agree(family, key):
    cfg = tiny(family, 2)
    params = init_params(cfg, key)
    tokens = jax.random.randint(key, (2, 9), 0, cfg.vocab_size)
    unrolled = cfg.replace(scan_layers=False)
    flat = unstack_layers(params, cfg.n_layers)
    chex.assert_trees_all_close(
        forward(cfg, params, tokens), forward(unrolled, flat, tokens), atol=1e-6, rtol=1e-6
    )
    chex.assert_trees_all_equal(stack_layers(flat, cfg.n_layers), params)


@pytest.mark.parametrize(("family", "n_kv_heads"), VARIANTS)
def test_causal(family, n_kv_heads, key):
    cfg = tiny(family, n_kv_heads)
    params = init_params(cfg, key)
    a = jax.random.randint(key, (1, 10), 0, cfg.vocab_size)
    b = a.at[:, 6:].set((a[:, 6:] + 1) % cfg.vocab_size)
    la, lb = forward(cfg, params, a), forward(cfg, params, b)
    np.testing.assert_allclose(la[:, :6], lb[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(la[:, 6:], lb[:, 6:])


@pytest.mark.parametrize(("family", "n_kv_heads"), VARIANTS)
def test_padding_masks_hide_padded_keys(family, n_kv_heads, key):
    """A left-padded prompt (positions shifted) gives the same logits as the prompt alone."""
    cfg = tiny(family, n_kv_heads)
    params = init_params(cfg, key)
    prompt = jax.random.randint(key, (1, 6), 0, cfg.vocab_size)
    n_pad = 3
    junk = jax.random.randint(jax.random.key(7), (1, n_pad), 0, cfg.vocab_size)
    padded = jnp.concatenate([junk, prompt], axis=1)
    positions = jnp.maximum(jnp.arange(9) - n_pad, 0)[None, :]
    alone = forward(cfg, params, prompt)
    shifted = forward(cfg, params, padded, pad=jnp.array([n_pad]), positions=positions)
    np.testing.assert_allclose(shifted[:, n_pad:], alone, rtol=1e-5, atol=1e-5)
    unmasked = forward(cfg, params, padded, positions=positions)
    assert not np.allclose(unmasked[:, n_pad:], alone, atol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_pass_equals_full_pass(family, key):
    """A prefill through the cache, then one token at a time: the logits of the full pass."""
    from jaxllm.serve import cached_forward

    cfg = tiny(family, 2, scan_layers=False)
    params = unstack_layers(init_params(tiny(family, 2), key), cfg.n_layers)
    tokens = jax.random.randint(key, (2, 8), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    full = forward(cfg.replace(scan_layers=True), stack_layers(params, cfg.n_layers), tokens)
    cache = KVCache.init(cfg, batch=2, capacity=12)
    apply = jax.jit(functools.partial(cached_forward, cfg))
    first, cache = apply(params, cache, tokens[:, :5], positions[:, :5])
    outs = [first]
    for t in range(5, 8):
        step, cache = apply(params, cache, tokens[:, t : t + 1], positions[:, t : t + 1])
        outs.append(step)
    assert int(cache.index) == 8
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_keeps_values_and_gradients(remat, key):
    cfg = tiny("llama", 2)
    params = init_params(cfg, key)
    tokens = jax.random.randint(key, (2, 8), 0, cfg.vocab_size)

    def loss(p, c):
        return jnp.mean(forward(c, p, tokens) ** 2)

    chex.assert_trees_all_close(
        jax.grad(loss)(params, cfg),
        jax.grad(loss)(params, cfg.replace(remat=remat)),
        atol=1e-6,
        rtol=1e-5,
    )


def test_gpt2_initialisation_scales(key):
    cfg = tiny("gpt2", 4, d_model=64, d_ff=256, n_layers=8)
    params = _init_params(cfg, key)
    blocks = params["blocks"]
    np.testing.assert_allclose(jnp.std(params["embed"]["embedding"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(jnp.std(blocks["mlp"]["up"]["kernel"]), 0.02, rtol=0.1)
    residual = 0.02 / np.sqrt(2 * cfg.n_layers)
    np.testing.assert_allclose(jnp.std(blocks["attn"]["o"]["kernel"]), residual, rtol=0.1)
    np.testing.assert_allclose(jnp.std(blocks["mlp"]["down"]["kernel"]), residual, rtol=0.1)


def test_mixed_precision_keeps_f32_params_and_bf16_compute(key):
    cfg = tiny("llama", 2, dtype="bfloat16")
    params = _init_params(cfg, key)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    tokens = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: forward(cfg, p, tokens))(params)
    assert "bf16" in str(jaxpr)


@pytest.mark.parametrize(("family", "n_kv_heads"), [("gpt2", 4), ("llama", 2)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 64)], ids=["1 row", "15 rows", "320 rows"])
def test_output_major_kernels_give_the_same_logits(family, n_kv_heads, shape, key):
    """The serving layout (kernel_order="out_in", every kernel's input axes moved last and merged)
    computes the in_out model's logits: one row (matrix-vector), weight-major (2..WEIGHT_MAJOR_ROWS rows) and
    row-major (more), tied and untied heads, grouped-query attention."""
    cfg = tiny(family, n_kv_heads, scan_layers=False)
    params = unstack_layers(init_params(cfg, key), cfg.n_layers)
    tokens = jax.random.randint(key, shape, 0, cfg.vocab_size)
    out_in = cfg.replace(kernel_order="out_in")
    moved = output_major(params)
    o_kernel = moved["block_0"]["attn"]["o"]["kernel"]
    assert o_kernel.shape == (cfg.d_model, cfg.n_heads * cfg.head_dim)  # [N, H, D] -> [D, N·H]
    chex.assert_trees_all_equal_shapes(moved, param_shapes(out_in))
    chex.assert_trees_all_close(
        forward(cfg, params, tokens), forward(out_in, moved, tokens), atol=2e-5, rtol=2e-5
    )
