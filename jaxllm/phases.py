"""The three compiled phases by name, with abstract arguments to analyse them and fresh concrete ones
to time them, and the analytic view of each.

- ``train``: ``jaxllm.train.make_train_step(config, make_optimizer())`` on a batch [B, T + 1];
  B·T tokens per call.
- ``prefill``: ``jaxllm.serve.make_prefill(config)`` on tokens [B, T] into an empty cache of
  capacity S = T; B·T tokens per call. It reads none of the empty cache, and runs the head at each
  row's last position only.
- ``decode``: ``jaxllm.serve.make_decode_step(config)``, one token per sequence. ``--seq S`` is the
  context the step completes: S - 1 tokens are cached (index S - 1) and the step writes the S-th, so
  S <= max_len. Capacity policy: S rounded up to a power of two, at most max_len (jaxllm.serve's
  bucketing), and the step attends over all of them (no window).
Sizes are checked here, before anything is traced.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import analytic, serve, train
from jaxllm.batching import bucket
from jaxllm.cache import KVCache, cache_dtype
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError, positive_int
from jaxllm.model import param_shapes

PHASES = ("train", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class Program:
    """One phase at one shape: the jitted function (with its donation) and its arguments."""

    phase: str
    config: ModelConfig
    batch: int
    seq: int
    capacity: int  # cache slots (0 for train)
    slots: int  # cache slots the program reads (prefill: 0; decode: the capacity)
    tokens: int  # tokens processed per call
    jitted: Any
    abstract_args: tuple[Any, ...]
    make_args: Callable[[jax.Array], Callable[[], tuple[Any, ...]]]  # key -> fresh-args factory


def check_sizes(config: ModelConfig, phase: str, batch: int, seq: int) -> None:
    """ValueError naming the value and the limit for an unknown phase or an impossible size."""
    if phase not in PHASES:
        raise InputError(f"unknown phase {phase!r}; phases are: {', '.join(PHASES)}")
    for name, value in (("batch", batch), ("seq", seq)):
        positive_int(f"--{name}", value)
    if seq > config.max_len:
        raise InputError(
            f"--seq {seq} is beyond the context length max_len={config.max_len} of this config"
        )


def cache_capacity(config: ModelConfig, phase: str, seq: int) -> int:
    """Cache slots of the analysed program: none (train), the prompt's (prefill), or for a decode
    step completing ``seq`` tokens, ``seq`` rounded up to a power of two, at most max_len (the
    bucket ``jaxllm.generate`` would allocate for a cache with room for the step)."""
    if phase == "train":
        return 0
    if phase == "prefill":
        return seq
    return min(config.max_len, bucket(seq))


def _unwrap(phase: Any) -> Any:
    """jaxllm.serve returns a Phase (Python checks + ``.jitted``); analysis lowers the jitted part."""
    return getattr(phase, "jitted", phase)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _filler(salt: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Uniform in [-0.02, 0.02): an integer hash of each element's index and ``salt``."""
    x = jax.lax.iota(jnp.uint32, math.prod(shape)) * jnp.uint32(2654435761) + salt
    x = x ^ (x >> 15)
    unit = (x >> 8).astype(jnp.float32) * (2.0**-24)  # [0, 1)
    return ((unit - 0.5) * 0.04).astype(dtype).reshape(shape)


def filler_params(shapes: Any, seed: int = 0) -> Any:
    """Weights to time a phase with: deterministic, varied, in [-0.02, 0.02), one small compiled
    program per distinct parameter shape (``shapes``: ``param_shapes(config)``). A phase's time
    does not depend on weight values, while drawing 10^8-10^9 normal samples (``init_params``)
    costs more than the timing itself."""
    leaves, tree = jax.tree.flatten(shapes)
    salts = [jnp.uint32((seed * 1000003 + i) * 40503 % 2**32) for i in range(len(leaves))]
    return tree.unflatten(
        [_filler(k, s.shape, s.dtype) for k, s in zip(salts, leaves, strict=True)]
    )


def _train(config: ModelConfig, batch: int, seq: int) -> tuple[Any, tuple, Callable]:
    optimizer = train.make_optimizer()
    step = train.make_train_step(config, optimizer)
    state = jax.eval_shape(lambda: train.init_state(config, optimizer, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)

    def make_args(key: jax.Array) -> Callable[[], tuple]:
        params = filler_params(state.params)
        fresh = jax.jit(lambda p: train.state_from_params(p, optimizer))(params)
        data = jax.random.randint(key, (batch, seq + 1), 0, config.vocab_size, jnp.int32)
        copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))  # the state is donated
        return lambda: (copy(fresh), data)

    return step, (state, tokens), make_args


def _cache(config: ModelConfig, batch: int, capacity: int, index: int) -> Any:
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, capacity))
    fresh = jax.jit(lambda: KVCache.init(config, batch, capacity).replace(index=jnp.int32(index)))
    return cache, fresh


def _serve(config: ModelConfig, phase: str, batch: int, seq: int, capacity: int):
    index = 0 if phase == "prefill" else seq - 1  # a decode step completes a context of seq tokens
    abstract_cache, fresh_cache = _cache(config, batch, capacity, index)
    tokens = jax.ShapeDtypeStruct((batch, seq) if phase == "prefill" else (batch,), jnp.int32)
    pad = jax.ShapeDtypeStruct((batch,), jnp.int32)

    params = param_shapes(config)

    def make_args(key: jax.Array) -> Callable[[], tuple]:
        weights = filler_params(params)
        ids = jax.random.randint(key, tokens.shape, 0, config.vocab_size, jnp.int32)
        if phase == "prefill":
            return lambda: (weights, fresh_cache(), ids, jnp.zeros((batch,), jnp.int32))
        return lambda: (weights, fresh_cache(), ids)

    if phase == "prefill":
        return _unwrap(serve.make_prefill(config)), (params, abstract_cache, tokens, pad), make_args
    return _unwrap(serve.make_decode_step(config)), (params, abstract_cache, tokens), make_args


def build(config: ModelConfig, phase: str, batch: int, seq: int) -> Program:
    """The ``phase`` program for tokens [batch, seq] (decode: a step completing ``seq`` tokens)."""
    check_sizes(config, phase, batch, seq)
    capacity = cache_capacity(config, phase, seq)
    if phase == "train":
        jitted, args, make_args = _train(config, batch, seq)
    else:
        # Served as jaxllm.generate serves it (serve.serving_config): layers unrolled, since
        # slicing stacked weights and cache per layer copies them on every step, and weights stored
        # in the compute dtype.
        config = serve.serving_config(config)
        jitted, args, make_args = _serve(config, phase, batch, seq, capacity)
    tokens = batch if phase == "decode" else batch * seq
    slots = capacity if phase == "decode" else 0
    return Program(phase, config, batch, seq, capacity, slots, tokens, jitted, args, make_args)


def analytic_view(program: Program) -> analytic.AnalyticView:
    """Closed-form FLOPs (both attention conventions), compulsory bytes and memory of ``program``."""
    cfg, B, S, cap, read = (
        program.config,
        program.batch,
        program.seq,
        program.capacity,
        program.slots,
    )
    moved = None  # decode only: decode_bytes' parts
    if program.phase == "train":
        flops = {c: analytic.train_flops(cfg, B, S, c) for c in ("xla", "causal")}
        memory = analytic.train_memory(cfg, B, S)
        # Compulsory traffic: the state read and written once, gradients written and read, the
        # saved activations written and re-read.
        state = memory["params"] + memory["adam"]
        nbytes = 2 * state + 2 * memory["grads"] + 2 * memory["activations"]
    elif program.phase == "prefill":
        flops = {c: analytic.prefill_flops(cfg, B, S, read, c, 1) for c in ("xla", "causal")}
        memory = analytic.serve_memory(cfg, B, cap, cache_dtype(cfg))
        # Weights read once (gathered tables: the prompt's rows), the cache written, float32
        # logits of the last position out.
        nbytes = (
            analytic.weight_bytes_read(cfg, B * S) + memory["kv_cache"] + B * cfg.vocab_size * 4
        )
    else:
        flops = {c: analytic.decode_flops(cfg, B, S - 1, read, c) for c in ("xla", "causal")}
        memory = analytic.serve_memory(cfg, B, cap, cache_dtype(cfg))
        moved = analytic.decode_bytes(cfg, B, S - 1, read, cache_dtype(cfg))
        nbytes = moved["total_allocated"]
    return analytic.AnalyticView(
        flops=flops["xla"],
        flops_causal=flops["causal"],
        flops_convention="matmuls only; 'flops' attends over every slot the program scores "
        "(the blocked causal pass's pairs, or T×(S+T) with a cache); 'flops_causal' counts "
        "only useful causal pairs",
        bytes=nbytes,
        memory=memory,
        params=analytic.param_counts(cfg)["total"],
        tokens=program.tokens,
        capacity=cap,
        slots_read=read,
        decode_bytes=moved,
    )
