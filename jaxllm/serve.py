"""The two serving phases of a left-padded batch, each a jitted pure function over a donated KVCache.

- ``make_prefill(config)(params, cache, tokens[B, T], pad[B]) -> (logits[B, V], cache)``: the
  left-padded prompts fill slots [0, T) of an empty cache; ``pad[b]`` masks row b's padding keys and
  shifts its positions (position = slot - pad[b], 0 on padding), so a padded prompt computes what it
  computes alone. The prompt attends to itself only (the empty cache is not read). The logits are those
  of each row's last position (the head runs there alone).
- ``make_decode_step(config)(params, cache, tokens[B]) -> (logits[B, V], cache)``: one token per row,
  written at slot ``cache.index``, attending to every slot of the cache.

Both take the cache second and donate it. On a device mesh (``make_prefill(config, mesh)``) they are
jitted with the shardings of ``jaxllm.mesh.ServeLayout``: weights as the partition rules say, the
cache and every [B, ...] input split over data and fsdp on B, the cache over tensor on K. They are
cached per (config, mesh) and return a ``Phase``: calling
it checks the inputs in Python (shapes, token ids, room in the cache: XLA clamps an out-of-range write
silently) before the jitted function runs; ``Phase.lower`` lowers the jitted function from abstract
inputs, without the checks. Both serve unrolled layers (``serving_config``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxllm import analytic
from jaxllm import mesh as meshes
from jaxllm.cache import KVCache, cache_dtype
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import Params, Transformer, output_major, unstack_layers
from jaxllm.xla_options import serve_options

Prompt = Sequence[int] | np.ndarray  # token ids of one request


@dataclasses.dataclass(frozen=True)
class Phase:
    """A jitted serving phase with the Python checks that run before each call."""

    jitted: Any  # the jax.jit-wrapped function
    check: Callable[..., None]  # raises ValueError on bad input; reads small values to the host

    def __call__(self, *args: Any) -> Any:
        self.check(*args)
        return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower``: accepts ``jax.ShapeDtypeStruct``s; no checks, no allocation."""
        return self.jitted.lower(*args)


def _positions(index: jax.Array, pad: jax.Array, t: int) -> jax.Array:
    """Positions [B, T] of the T new tokens in slots index + t: slot - pad[b], 0 on padding."""
    slots = index + jnp.arange(t, dtype=jnp.int32)[None, :]  # [1, T]
    return jnp.maximum(slots - pad[:, None], 0)


def cached_forward(
    config: ModelConfig, params: Params, cache: KVCache, tokens: jax.Array, positions: jax.Array
) -> tuple[jax.Array, KVCache]:
    """The model on tokens [B, T] at positions [B, T] over a cache: their logits [B, T, V], attending
    to the cache's filled slots and causally to each other, and the cache with them written."""
    out: Any = Transformer(config).apply({"params": params}, tokens, positions, attend=cache.attend)
    logits, (k, v) = out
    return logits, cache.write(k, v)


def prefill(
    config: ModelConfig, params: Params, cache: KVCache, tokens: jax.Array, pad: jax.Array
) -> tuple[jax.Array, KVCache]:
    """The unchecked prefill (see the module docstring): a causal pass over the prompts alone."""
    pad = pad.astype(jnp.int32)
    B, T = tokens.shape
    last = jnp.full((B, 1), T - 1, jnp.int32)
    positions = _positions(cache.index, pad, T)
    out: Any = Transformer(config).apply(
        {"params": params}, tokens, positions, pad=pad, logits_at=last
    )
    logits, (k, v) = out
    return logits[:, 0], cache.replace(pad=pad).write(k, v)


def decode_step(
    config: ModelConfig, params: Params, cache: KVCache, tokens: jax.Array
) -> tuple[jax.Array, KVCache]:
    """The unchecked decode step (see the module docstring)."""
    positions = _positions(cache.index, cache.pad, 1)
    logits, cache = cached_forward(config, params, cache, tokens[:, None], positions)
    return logits[:, 0], cache


def check_tokens(config: ModelConfig, tokens: Any, what: str = "token") -> np.ndarray:
    """The ids as an int32 array; ValueError naming the first id outside [0, V)."""
    ids = np.asarray(tokens)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{what} ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= config.vocab_size)]
    if bad.size:
        raise InputError(f"{what} id {int(bad[0])} is outside [0, {config.vocab_size})")
    return ids.astype(np.int32)


def _check_batch(cache: KVCache, batch: int, what: str) -> None:
    if batch != cache.batch:
        raise InputError(f"{what} has batch {batch}, the cache was built for batch {cache.batch}")


def _check_prefill(
    config: ModelConfig, params: Params, cache: KVCache, tokens: Any, pad: Any
) -> None:
    del params
    ids, pad = check_tokens(config, tokens, "prompt token"), np.asarray(pad)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"prefill tokens must be [B, T] with T >= 1, got shape {ids.shape}")
    cache.check_built_for(config)
    _check_batch(cache, ids.shape[0], "prefill tokens")
    if pad.shape != ids.shape[:1] or np.any(pad < 0) or np.any(pad >= ids.shape[1]):
        raise InputError(
            f"pad must be [B] = {ids.shape[:1]} with each value in [0, {ids.shape[1]}) "
            f"(at least one real token per row), got {pad.tolist()}"
        )
    index = cache.check_room(ids.shape[1], config.max_len)
    if index != 0:
        raise InputError(f"prefill needs an empty cache (index 0), got index {index}")


def _check_decode(config: ModelConfig, params: Params, cache: KVCache, tokens: Any) -> None:
    del params
    ids = check_tokens(config, tokens)
    if ids.ndim != 1:
        raise InputError(f"decode tokens must be [B], got shape {ids.shape}")
    cache.check_built_for(config)
    _check_batch(cache, ids.shape[0], "decode tokens")
    if int(cache.index) == 0:
        raise InputError("decode_step needs a prefilled cache (index 0: run prefill first)")
    cache.check_room(1, config.max_len)


def _check_served(config: ModelConfig) -> None:
    if config.scan_layers:
        raise InputError(
            "serving runs unrolled layers: use serve.for_serving(config, params) (scan_layers=False)"
        )


def _checks(config: ModelConfig, mesh: Mesh | None, check: Callable[..., None]) -> Callable:
    """``check`` of a phase's arguments (params, cache, ...), then, on a mesh, that it divides the
    heads, the widths and the cache's batch B."""

    def run(params: Params, cache: KVCache, *rest: Any) -> None:
        check(config, params, cache, *rest)
        if mesh is not None:
            meshes.check_divides(mesh, config, cache.batch)

    return run


def _jit(fn: Callable, config: ModelConfig, mesh: Mesh | None, row_inputs: int) -> Any:
    """``fn(params, cache, *inputs) -> (logits [B, V], cache)`` jitted with the cache donated; on a
    mesh, with the shardings of ``jaxllm.mesh.ServeLayout`` (``row_inputs`` [B, ...] arrays after
    the cache, each split like B), the weights gathered over fsdp where they are used
    (``jaxllm.mesh.with_gathered_weights``)."""
    options = serve_options()
    if mesh is None:
        return jax.jit(fn, donate_argnums=1, compiler_options=options)
    at = meshes.ServeLayout.of(mesh, config)
    return jax.jit(
        meshes.with_gathered_weights(fn, mesh),
        donate_argnums=1,
        in_shardings=(at.params, at.cache, *(at.rows,) * row_inputs),
        out_shardings=(at.rows, at.cache),
        compiler_options=options,
    )


@functools.cache
def make_prefill(config: ModelConfig, mesh: Mesh | None = None) -> Phase:
    """The prefill phase for ``config``: jitted, the cache (argument 1) donated; laid out on
    ``mesh`` as ``jaxllm.mesh.ServeLayout`` says (None: one device)."""
    _check_served(config)
    fn = _jit(functools.partial(prefill, config), config, mesh, row_inputs=2)
    return Phase(fn, _checks(config, mesh, _check_prefill))


@functools.cache
def make_decode_step(config: ModelConfig, mesh: Mesh | None = None) -> Phase:
    """The decode step for ``config``: jitted, the cache (argument 1) donated and updated in place;
    laid out on ``mesh`` as ``jaxllm.mesh.ServeLayout`` says (None: one device)."""
    _check_served(config)
    fn = _jit(functools.partial(decode_step, config), config, mesh, row_inputs=1)
    return Phase(fn, _checks(config, mesh, _check_decode))


def serving_config(config: ModelConfig, mesh: Mesh | None = None) -> ModelConfig:
    """The config served: layers unrolled (``scan_layers=False``), parameters stored in the compute
    dtype (``param_dtype=dtype``), no rematerialisation (it only matters to a backward pass), and
    on one CPU device, kernels output-major (``kernel_order="out_in"``).

    On CPU, XLA materialises each layer's slice of stacked [L, ...] weights (and cache) as a copy, so a
    decode step over scanned layers copies every weight once per step. Decoding reads every weight
    once per step, so bf16 serving stores them in bf16: half the bytes, and no per-step conversion.
    Training keeps float32 master weights (``param_dtype``) whatever the compute dtype.

    Output-major kernels let XLA:CPU's products of a few rows run weight-major or against a
    row-major [out, in] weight, whichever is faster (``products.project_out_in``): gpt2's f32 decode
    step ran 1.5-2x as fast at 8 and 32 rows. Not on a mesh (the partition rules are written for
    in_out kernels), not on an accelerator (not measured there).
    """
    order = "out_in" if jax.default_backend() == "cpu" and mesh is None else "in_out"
    return config.replace(
        scan_layers=False, param_dtype=config.dtype, remat="none", kernel_order=order
    )


def serving_memory(
    config: ModelConfig, batch: int, slots: int, mesh: Mesh | None = None
) -> dict[str, int]:
    """``analytic.serve_memory`` of ``config`` as it is served (``serving_config``: weights in the
    compute dtype) with its cache in the dtype serving keeps it (``cache.cache_dtype``): what the
    prefill and decode programs hold (on a mesh, in all: not one device's share)."""
    served = serving_config(config, mesh)
    return analytic.serve_memory(served, batch, slots, cache_dtype(served))


def for_serving(
    config: ModelConfig, params: Params, mesh: Mesh | None = None
) -> tuple[ModelConfig, Params]:
    """``serving_config(config, mesh)`` and the parameters in its layout and dtype (unstacked,
    kernels reordered, cast)."""
    served = serving_config(config, mesh)
    if config.scan_layers:
        params = unstack_layers(params, config.n_layers)
    if config.kernel_order != served.kernel_order:
        if config.kernel_order == "out_in":
            raise InputError(
                f"parameters with kernel_order={config.kernel_order!r} cannot be served "
                f"{'on a mesh' if mesh is not None else 'here'}: serve the trained (in_out) ones"
            )
        params = output_major(params)
    return served, jax.tree.map(lambda x: x.astype(served.storage_dtype), params)
