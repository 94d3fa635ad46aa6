"""Independent jitted phases of ``Transformer.apply`` for testing the measurement machinery.

Written here from the model's contract (not jaxllm.train / jaxllm.serve) so that the analytic counts and
the loop correction are checked against programs of known content.
"""

import jax
import jax.numpy as jnp
import optax

from jaxllm.cache import KVCache
from jaxllm.config import ModelConfig
from jaxllm.model import Transformer, param_shapes

OPTIMIZER = optax.adamw(1e-3)


def loss_fn(config: ModelConfig):
    model = Transformer(config)

    def loss(params, batch):  # batch [B, T + 1]
        x, y = batch[:, :-1], batch[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)
        logits, _ = model.apply({"params": params}, x, positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def train_step(config: ModelConfig):
    """jit((params, opt_state), batch[B, T + 1]) -> (state, loss), state donated."""
    loss = loss_fn(config)

    def step(state, batch):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, batch)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with int32 counts
            updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

    return jax.jit(step, donate_argnums=0)


def cache_pass(config: ModelConfig):
    """jit(params, tokens[B, T], cache) -> (logits of the last position [B, V], cache), cache donated.

    With an empty cache it is a prefill that reads the whole (empty) cache; with T = 1 a decode
    step. Unrolled layers (a cache supplies each layer's attention)."""
    model = Transformer(config)

    def run(params, tokens, cache):
        positions = cache.index + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, (k, v) = model.apply({"params": params}, tokens, positions, attend=cache.attend)
        return logits[:, -1], cache.write(k, v)

    return jax.jit(run, donate_argnums=2)


def train_args(config: ModelConfig, batch: int, seq: int):
    params = param_shapes(config)
    state = (params, jax.eval_shape(OPTIMIZER.init, params))
    return state, jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)


def cache_args(config: ModelConfig, batch: int, tokens: int, capacity: int):
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, capacity))
    return param_shapes(config), jax.ShapeDtypeStruct((batch, tokens), jnp.int32), cache
