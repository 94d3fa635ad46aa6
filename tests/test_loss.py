import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny

from jaxllm import products
from jaxllm.loss import head_cross_entropy
from jaxllm.model import Transformer, head_kernel, init_params, output_major, unstack_layers

R, D, V = 96, 32, 97


def _operands(dtype, out_major, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (R, D))
    kernel = jax.random.normal(keys[1], (V, D) if out_major else (D, V)) * 0.5
    targets = jax.random.randint(keys[2], (R,), 0, V).at[:2].set(jnp.array([0, V - 1]))
    return x.astype(dtype), kernel.astype(dtype), targets


def _optax_loss(x, kernel, targets, out_major):
    """The reference: float32 logits of the same (rounded) operands, optax's cross entropy."""
    w = kernel.astype(jnp.float32)
    logits = jnp.matmul(x.astype(jnp.float32), w.T if out_major else w, precision="highest")
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("out_major", [True, False], ids=["out_major", "in_major"])
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)], ids=["f32", "bf16"]
)
def test_head_cross_entropy_equals_optax_in_value_and_gradients(dtype, rtol, out_major):
    """Value and gradients against autodiff of optax's loss on float32 logits. In bf16 the fused
    backward rounds the logits' gradient to bf16 for the products (as the model's projections do),
    so the gradients agree to bf16's precision."""
    x, kernel, targets = _operands(dtype, out_major)

    def ours(x, k):
        return head_cross_entropy(x, k, targets, dtype, out_major)

    def theirs(x, k):
        return _optax_loss(x, k, targets, out_major)

    loss, (dx, dk) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(x, kernel)
    want, (wx, wk) = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1)))(x, kernel)
    assert loss.dtype == jnp.float32 and dx.dtype == dtype and dk.dtype == dtype
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for got, ref in ((dx, wx), (dk, wk)):
        ref = np.asarray(ref, np.float32)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), ref, rtol=rtol, atol=rtol * np.abs(ref).max()
        )


def test_head_cross_entropy_scales_its_gradient_by_the_cotangent():
    x, kernel, targets = _operands(jnp.float32, True)
    grad = jax.grad(lambda x: 3.0 * head_cross_entropy(x, kernel, targets, jnp.float32, True))
    grad1 = jax.grad(lambda x: head_cross_entropy(x, kernel, targets, jnp.float32, True))
    want = 3.0 * np.asarray(grad1(x))
    np.testing.assert_allclose(grad(x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_widened_bf16_head_gives_the_library_head_loss(monkeypatch):
    """On a CPU without bf16 arithmetic the head's product runs on widened operands: the same loss."""
    x, kernel, targets = _operands(jnp.bfloat16, True)
    rows = jnp.concatenate([x] * 4)  # 384 rows: more than WIDEN_ROWS
    many = jnp.concatenate([targets] * 4)
    out = {}
    for features in ("avx2 fma", "avx2 avx512_bf16"):
        monkeypatch.setattr(products, "cpu_features", lambda f=features: frozenset(f.split()))
        out[features] = float(
            jax.jit(head_cross_entropy, static_argnums=(3, 4))(
                rows, kernel, many, jnp.bfloat16, True
            )
        )
    assert out["avx2 fma"] == pytest.approx(out["avx2 avx512_bf16"], rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("order", ["in_out", "out_in"])
def test_hidden_states_against_head_kernel_give_the_logits(family, order):
    """``hidden=True`` returns what the head multiplies: x against ``head_kernel`` equals the
    logits, for tied (gpt2) and untied (llama) heads in either kernel order."""
    cfg = tiny(family, scan_layers=False)
    params = unstack_layers(init_params(cfg.replace(scan_layers=True), jax.random.key(0)), 2)
    if order == "out_in":
        cfg, params = cfg.replace(kernel_order="out_in"), output_major(params)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    apply = jax.jit(Transformer(cfg).apply, static_argnames="hidden")
    logits, _ = apply({"params": params}, tokens, positions)
    x, _ = apply({"params": params}, tokens, positions, hidden=True)
    kernel, out_major = head_kernel(params, cfg)
    w = kernel.T if out_major else kernel
    chex.assert_trees_all_close(x @ w, logits, atol=1e-5, rtol=1e-5)
