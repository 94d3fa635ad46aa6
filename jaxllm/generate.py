"""Generation of a left-padded batch: a prefill, then every decode step in one on-device loop.

``generate(config, params, prompts, max_new_tokens, ...)``: validation and bucketing in Python
(``jaxllm.batching``), then two compiled calls: the prefill (``jaxllm.serve``), and every decode step
in one ``lax.while_loop`` that runs until each row has stopped or reached its limit (no host round-trip
per token). The decode loop grows the cache in powers of two (``windows``): a step reads every slot.
Streams of requests that come and go are the serving engine's (``jaxllm.engine``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from jaxllm import mesh as meshes
from jaxllm.batching import Batch, bucket, make_batch
from jaxllm.cache import KVCache
from jaxllm.config import ModelConfig
from jaxllm.model import Params
from jaxllm.sampling import GREEDY, Sampler
from jaxllm.serve import Prompt, check_tokens, decode_step, for_serving, make_prefill
from jaxllm.xla_options import serve_options


class _LoopState(struct.PyTreeNode):
    cache: KVCache
    tokens: jax.Array  # [B] int32: the last sampled token of each row
    out: jax.Array  # [B, M] int32: sampled tokens, column n = the n-th new token
    length: jax.Array  # [B] int32: tokens kept per row (the stop token included)
    done: jax.Array  # [B] bool: the row stopped or reached its limit
    n: jax.Array  # [] int32: tokens sampled so far (columns of out filled)
    key: jax.Array


def _record(state: _LoopState, tokens: jax.Array, limits: jax.Array, stop: jax.Array) -> _LoopState:
    """Store the n-th sampled tokens; rows already done ignore theirs."""
    stopped = jnp.any(tokens[:, None] == stop[None, :], axis=-1)
    length = state.length + (~state.done).astype(jnp.int32)
    return state.replace(
        tokens=tokens,
        out=jax.lax.dynamic_update_slice(state.out, tokens[:, None], (0, state.n)),
        length=length,
        done=state.done | stopped | (length >= limits),
        n=state.n + 1,
    )


MIN_WINDOW = 64  # below this many slots, growing the cache costs more than it saves


def windows(prompt_len: int, capacity: int) -> list[int]:
    """The cache sizes W of a generation's decode phases, in order: a decode step writing slot
    ``index`` runs with the cache resized to the first W > index (a step reads all W slots). Powers of
    two from max(T + 1, S/8, MIN_WINDOW) rounded up, then S: at most four compiled loop bodies, and each
    step reads under 2x its filled slots once they pass S/8."""
    out, w = [], bucket(max(prompt_len + 1, capacity // 8, MIN_WINDOW))
    while w < capacity:
        out.append(w)
        w *= 2
    return [*out, capacity]


def _decode_loop(
    config: ModelConfig,
    sampler: Sampler,
    prompt_len: int,
    capacity: int,
    params: Params,
    cache: KVCache,  # the first phase's size, windows(prompt_len, capacity)[0] slots, prefilled
    logits: jax.Array,  # [B, V] from prefill
    key: jax.Array,
    limits: jax.Array,  # [B] int32, each in [1, S - T]
    stop: jax.Array,  # [n_stop] int32
) -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """Sample, then decode until every row is done: one ``lax.while_loop`` per cache size
    (``windows``), the cache grown between them.

    Returns out [B, S - T] (column n: the n-th new token), length [B], decode steps run, and the
    cache, grown to S = ``capacity`` slots.
    """
    B, width = logits.shape[0], capacity - prompt_len
    key, sub = jax.random.split(key)
    state = _LoopState(
        cache=cache,
        tokens=jnp.zeros((B,), jnp.int32),
        out=jnp.zeros((B, width), jnp.int32),
        length=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        n=jnp.zeros((), jnp.int32),
        key=key,
    )
    state = _record(state, sampler(logits, sub), limits, stop)

    def body(s: _LoopState) -> _LoopState:
        # Tied to the step count, the weights are no loop invariants to XLA: it cannot hoist a
        # converted (float32) copy of each out of the loop, to be read at twice the bytes per step.
        weights, _ = jax.lax.optimization_barrier((params, s.n))
        step_logits, cache = decode_step(config, weights, s.cache, s.tokens)
        key, sub = jax.random.split(s.key)
        return _record(s.replace(cache=cache, key=key), sampler(step_logits, sub), limits, stop)

    for window in windows(prompt_len, capacity):
        state = state.replace(cache=state.cache.resize(window))

        def cond(s: _LoopState, window: int = window) -> jax.Array:
            return (s.n < width) & ~jnp.all(s.done) & (s.cache.index < window)

        state = jax.lax.while_loop(cond, body, state)
    return state.out, state.length, state.n - 1, state.cache


@functools.cache
def make_decode_loop(
    config: ModelConfig, sampler: Sampler, prompt_len: int, capacity: int, mesh: Mesh | None = None
) -> Any:
    """``fn(params, cache, logits, key, limits, stop) -> (out, length, steps, cache)``, jitted:
    sampling and every decode step after a ``prompt_len``-token prefill into a cache of the first
    phase's size, growing it to ``capacity`` slots, on device. The cache is donated when it has one
    phase (in and out the same size; a grown cache cannot reuse the smaller buffer). On a ``mesh``,
    laid out as ``jaxllm.mesh.ServeLayout`` says ([B, ...] arrays split like B), the weights
    gathered over fsdp once, before the loop (as ``jaxllm.serve``'s phases gather them)."""
    fn = functools.partial(_decode_loop, config, sampler, prompt_len, capacity)
    donate = (1,) if len(windows(prompt_len, capacity)) == 1 else ()
    options = serve_options()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate, compiler_options=options)
    at = meshes.ServeLayout.of(mesh, config)
    return jax.jit(
        meshes.with_gathered_weights(fn, mesh),
        donate_argnums=donate,
        in_shardings=(at.params, at.cache, at.rows, at.replicated, at.rows, at.replicated),
        out_shardings=(at.rows, at.rows, at.replicated, at.cache),
        compiler_options=options,
    )


@dataclasses.dataclass(frozen=True)
class Generation:
    """New tokens per request, and how long the two phases took (seconds, wall clock)."""

    tokens: list[list[int]]  # each request's new tokens, its stop token excluded
    stopped: list[bool]  # True: ended on a stop token; False: reached its max_new_tokens
    compile_s: float  # compiling prefill and the decode loop (0 when already compiled)
    prefill_s: float  # prefill, dispatch to result
    decode_s: float  # sampling and every decode step
    decode_steps: int  # decode steps the batch ran (each writes one slot per row)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens that decode steps produced for live rows, per second of decode."""
        produced = sum(len(t) + s for t, s in zip(self.tokens, self.stopped, strict=True))
        return (produced - len(self.tokens)) / self.decode_s if self.decode_s > 0 else 0.0


def _split_outputs(
    out: np.ndarray, length: np.ndarray, stop: np.ndarray
) -> tuple[list[list[int]], list[bool]]:
    rows = [out[b, : length[b]].tolist() for b in range(out.shape[0])]
    stopped = [bool(r) and r[-1] in stop for r in rows]
    return [r[:-1] if s else r for r, s in zip(rows, stopped, strict=True)], stopped


def _prefill_batch(
    prefill: Any, params: Params, batch: Batch, cache: KVCache
) -> tuple[Any, Any, float]:
    """Run the compiled prefill on the batch; (logits, cache, seconds from dispatch to result)."""
    start = time.perf_counter()
    logits, cache = prefill(params, cache, batch.tokens, batch.pad)
    jax.block_until_ready(logits)
    return logits, cache, time.perf_counter() - start


def first_slots(batch: Batch) -> int:
    """Slots of the cache a batch is prefilled into: the first decode phase's (``windows``)."""
    return windows(batch.tokens.shape[1], batch.capacity)[0]


def _compile_prefill(config: ModelConfig, params: Params, batch: Batch, mesh: Mesh | None) -> Any:
    """Prefill compiled ahead for this batch's shapes, so that its timing excludes compilation.

    Call the returned executable itself: a later call of the jitted function compiles again (its
    concrete arguments carry shardings the abstract ones lack)."""
    cache = jax.eval_shape(lambda: KVCache.init(config, batch.tokens.shape[0], first_slots(batch)))
    return make_prefill(config, mesh).lower(params, cache, batch.tokens, batch.pad).compile()


def _place(
    config: ModelConfig, params: Params, batch: Batch, mesh: Mesh | None
) -> tuple[Params, KVCache]:
    """The parameters and an empty cache for ``batch`` (``first_slots``), laid out on ``mesh``
    (None: one device): the cache is created in place, never whole on one device."""
    rows, capacity = batch.tokens.shape[0], first_slots(batch)
    if mesh is None:
        return params, KVCache.init(config, rows, capacity)
    meshes.check_divides(mesh, config, rows, "prompts")
    at = meshes.ServeLayout.of(mesh, config)
    cache = jax.jit(lambda: KVCache.init(config, rows, capacity), out_shardings=at.cache)()
    return jax.device_put(params, at.params), cache


def generate(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Prompt],
    max_new_tokens: int | Sequence[int],
    sampler: Sampler = GREEDY,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] = (),
    mesh: Mesh | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` (one int, or one per prompt) new tokens for each prompt.

    A row stops after its first stop token (which is not returned) or at its limit. Two compiled
    calls: prefill, then the decode loop (one ``lax.while_loop``). ``key`` defaults to key 0. On a
    ``mesh`` both run sharded (``jaxllm.mesh.ServeLayout``); data x fsdp must divide the prompts.
    """
    config, params = for_serving(config, params, mesh)
    batch = make_batch(config, prompts, max_new_tokens)
    stop = check_tokens(config, np.asarray(stop_tokens, np.int32).reshape(-1), "stop token")
    key = jax.random.key(0) if key is None else key
    params, cache = _place(config, params, batch, mesh)
    loop = make_decode_loop(config, sampler, batch.tokens.shape[1], batch.capacity, mesh)
    start = time.perf_counter()
    prefill = _compile_prefill(config, params, batch, mesh)
    logits = jax.ShapeDtypeStruct((batch.tokens.shape[0], config.vocab_size), jnp.float32)
    decode = loop.lower(params, cache, logits, key, batch.limits, stop).compile()
    compile_s = time.perf_counter() - start
    logits, cache, prefill_s = _prefill_batch(prefill, params, batch, cache)
    start = time.perf_counter()
    out, length, steps, _ = decode(params, cache, logits, key, batch.limits, stop)
    out, length = np.asarray(out), np.asarray(length)
    decode_s = time.perf_counter() - start
    tokens, stopped = _split_outputs(out, length, stop)
    return Generation(tokens, stopped, compile_s, prefill_s, decode_s, int(steps))
