"""Serving: prefill, decode step and generation, each a jitted pure function over a donated KVCache.

- ``make_prefill(config)(params, tokens[B, T], pad[B], cache) -> (logits[B, V], cache)``: the left-padded
  prompts fill slots [0, T) of a fresh cache; ``pad[b]`` masks row b's padding keys and shifts its
  positions (position = slot - pad[b], 0 on padding), so a padded prompt computes what it computes alone.
  The logits are those of each row's last position (the same column for every row).
- ``make_decode_step(config)(params, cache, tokens[B]) -> (logits[B, V], cache)``: one token per row,
  written at slot ``cache.index``; the cache is donated and updated in place.
- ``generate(config, params, prompts, max_new_tokens, ...)``: validation and bucketing in Python, then
  two compiled calls: prefill, and every decode step in one on-device ``lax.while_loop`` that runs until
  each row has stopped or reached its limit (no host round-trip per token). ``generate_per_step`` gives
  the same tokens with a Python loop over the jitted decode step, for timing single steps.

Both builders are cached per config and return a ``Phase``: calling it checks the inputs in Python
(shapes, token ids, room in the cache: XLA clamps an out-of-range write silently) before the jitted
function runs; ``Phase.lower`` lowers the jitted function from abstract inputs, without the checks.

Bucket policy (it bounds the compilations to O(log² max_len) per batch size and sampler): the prompt
length T is the longest prompt rounded up to a power of two, lowered if needed (not below the longest
prompt) so that T + max_new_tokens fits in max_len; the cache capacity S is T + max_new_tokens rounded
up to a power of two, at most max_len.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllm.cache import KVCache
from jaxllm.config import ModelConfig
from jaxllm.model import Params, Transformer, unstack_layers
from jaxllm.sampling import GREEDY, Sampler

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


def _apply(
    config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """The model on tokens [B, T] at positions [B, T] with a cache: (logits [B, T, V], cache)."""
    out = Transformer(config).apply({"params": params}, tokens, positions, cache=cache)
    return out  # pyright: ignore[reportReturnType]


def _prefill(
    config: ModelConfig, params: Params, tokens: jax.Array, pad: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    window = cache.window
    # The cache is empty (index 0): read none of it, attend to the prompt alone.
    cache = cache.replace(pad=pad.astype(jnp.int32), window=0)
    positions = _positions(cache.index, cache.pad, tokens.shape[1])
    logits, cache = _apply(config, params, tokens, positions, cache)
    return logits[:, -1], cache.replace(window=window)


def _decode_step(
    config: ModelConfig, params: Params, cache: KVCache, tokens: jax.Array
) -> tuple[jax.Array, KVCache]:
    logits, cache = _apply(
        config, params, tokens[:, None], _positions(cache.index, cache.pad, 1), cache
    )
    return logits[:, 0], cache


def check_tokens(config: ModelConfig, tokens: Any, what: str = "token") -> np.ndarray:
    """The ids as an int32 array; ValueError naming the first id outside [0, V)."""
    ids = np.asarray(tokens)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= config.vocab_size)]
    if bad.size:
        raise ValueError(f"{what} id {int(bad[0])} is outside [0, {config.vocab_size})")
    return ids.astype(np.int32)


def _check_batch(cache: KVCache, batch: int, what: str) -> None:
    if batch != cache.batch:
        raise ValueError(f"{what} has batch {batch}, the cache was built for batch {cache.batch}")


def _check_prefill(
    config: ModelConfig, params: Params, tokens: Any, pad: Any, cache: KVCache
) -> None:
    del params
    ids, pad = check_tokens(config, tokens, "prompt token"), np.asarray(pad)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"prefill tokens must be [B, T] with T >= 1, got shape {ids.shape}")
    cache.check_built_for(config)
    _check_batch(cache, ids.shape[0], "prefill tokens")
    if pad.shape != ids.shape[:1] or np.any(pad < 0) or np.any(pad >= ids.shape[1]):
        raise ValueError(
            f"pad must be [B] = {ids.shape[:1]} with each value in [0, {ids.shape[1]}) "
            f"(at least one real token per row), got {pad.tolist()}"
        )
    index = cache.check_room(ids.shape[1], config.max_len)
    if index != 0:
        raise ValueError(f"prefill needs an empty cache (index 0), got index {index}")


def _check_decode(config: ModelConfig, params: Params, cache: KVCache, tokens: Any) -> None:
    del params
    ids = check_tokens(config, tokens)
    if ids.ndim != 1:
        raise ValueError(f"decode tokens must be [B], got shape {ids.shape}")
    cache.check_built_for(config)
    _check_batch(cache, ids.shape[0], "decode tokens")
    if int(cache.index) == 0:
        raise ValueError("decode_step needs a prefilled cache (index 0: run prefill first)")
    cache.check_room(1, config.max_len)


@functools.cache
def make_prefill(config: ModelConfig) -> Phase:
    """The prefill phase for ``config``: jitted, the cache (argument 3) donated."""
    fn = jax.jit(functools.partial(_prefill, config), donate_argnums=3)
    return Phase(fn, functools.partial(_check_prefill, config))


@functools.cache
def make_decode_step(config: ModelConfig) -> Phase:
    """The decode step for ``config``: jitted, the cache (argument 1) donated and updated in place."""
    fn = jax.jit(functools.partial(_decode_step, config), donate_argnums=1)
    return Phase(fn, functools.partial(_check_decode, config))


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


MIN_WINDOW = 64  # below this many slots, slicing a window out costs more than it saves


def windows(prompt_len: int, capacity: int) -> list[int]:
    """The attended windows W of a generation, in order: a decode step at slot ``index`` reads slots
    [0, W) for the first W >= index. Powers of two from max(T, S/8, MIN_WINDOW) rounded up, then S:
    at most four compiled loop bodies, and each step reads under 2x its filled slots once they pass
    S/8."""
    out, w = [], _pow2(max(prompt_len, capacity // 8, MIN_WINDOW))
    while w < capacity:
        out.append(w)
        w *= 2
    return [*out, capacity]


def _decode_loop(
    config: ModelConfig,
    sampler: Sampler,
    prompt_len: int,
    params: Params,
    cache: KVCache,
    logits: jax.Array,  # [B, V] from prefill
    key: jax.Array,
    limits: jax.Array,  # [B] int32, each in [1, S - T]
    stop: jax.Array,  # [n_stop] int32
) -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """Sample, then decode until every row is done: one ``lax.while_loop`` per attended window.

    Returns out [B, S - T] (column n: the n-th new token), length [B], decode steps run, cache.
    """
    B, width = logits.shape[0], cache.capacity - prompt_len
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
        step_logits, cache = _decode_step(config, params, s.cache, s.tokens)
        key, sub = jax.random.split(s.key)
        return _record(s.replace(cache=cache, key=key), sampler(step_logits, sub), limits, stop)

    for window in windows(prompt_len, cache.capacity):
        state = state.replace(cache=state.cache.replace(window=window))

        def cond(s: _LoopState, window: int = window) -> jax.Array:
            return (s.n < width) & ~jnp.all(s.done) & (s.cache.index <= window)

        state = jax.lax.while_loop(cond, body, state)
    return state.out, state.length, state.n - 1, state.cache.replace(window=cache.window)


@functools.cache
def make_decode_loop(config: ModelConfig, sampler: Sampler, prompt_len: int) -> Any:
    """``fn(params, cache, logits, key, limits, stop) -> (out, length, steps, cache)``, jitted, the
    cache donated: sampling and every decode step after a ``prompt_len``-token prefill, on device."""
    fn = functools.partial(_decode_loop, config, sampler, prompt_len)
    return jax.jit(fn, donate_argnums=1)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def buckets(config: ModelConfig, longest: int, max_new_tokens: int) -> tuple[int, int]:
    """(T, S): the padded prompt length and the cache capacity (see the module docstring)."""
    T = max(longest, min(_pow2(longest), config.max_len - max_new_tokens))
    return T, min(config.max_len, _pow2(T + max_new_tokens))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Prompts left-padded into one bucket, with each row's limit of new tokens."""

    tokens: np.ndarray  # [B, T] int32, row b = pad[b] copies of token 0, then its prompt
    pad: np.ndarray  # [B] int32
    limits: np.ndarray  # [B] int32: new tokens allowed per row
    capacity: int  # S: cache slots


def make_batch(
    config: ModelConfig, prompts: Sequence[Prompt], max_new_tokens: int | Sequence[int]
) -> Batch:
    """Validate the requests and left-pad them; ValueError naming the bad value and the limit."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    rows = [check_tokens(config, p, "prompt token").reshape(-1) for p in prompts]
    limits = np.asarray(max_new_tokens)
    if not np.issubdtype(limits.dtype, np.integer) or limits.shape not in ((), (len(rows),)):
        raise ValueError(
            f"max_new_tokens must be one integer or one per prompt ({len(rows)}), "
            f"got {max_new_tokens!r}"
        )
    limits = np.broadcast_to(limits, (len(rows),))
    for i, (row, limit) in enumerate(zip(rows, limits, strict=True)):
        if row.size == 0:
            raise ValueError(f"prompt {i} is empty")
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {int(limit)} for prompt {i}")
        if row.size + limit > config.max_len:
            raise ValueError(
                f"prompt {i} has {row.size} tokens + max_new_tokens {int(limit)} = "
                f"{row.size + int(limit)}, beyond the model's context (max_len) {config.max_len}"
            )
    T, S = buckets(config, max(r.size for r in rows), int(limits.max()))
    tokens = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        tokens[b, T - row.size :] = row
    pad = np.array([T - r.size for r in rows], np.int32)
    return Batch(tokens, pad, limits.astype(np.int32), S)


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
    logits, cache = prefill(params, batch.tokens, batch.pad, cache)
    jax.block_until_ready(logits)
    return logits, cache, time.perf_counter() - start


def _compile_prefill(config: ModelConfig, params: Params, batch: Batch) -> Any:
    """Prefill compiled ahead for this batch's shapes, so that its timing excludes compilation.

    Call the returned executable itself: a later call of the jitted function compiles again (its
    concrete arguments carry shardings the abstract ones lack)."""
    cache = jax.eval_shape(lambda: KVCache.init(config, batch.tokens.shape[0], batch.capacity))
    return make_prefill(config).lower(params, batch.tokens, batch.pad, cache).compile()


def serving_config(config: ModelConfig) -> ModelConfig:
    """The config served: layers unrolled (``scan_layers=False``) and parameters stored in the compute
    dtype (``param_dtype=dtype``).

    On CPU, XLA materialises each layer's slice of stacked [L, ...] weights (and cache) as a copy, so a
    decode step over scanned layers copies every weight once per step. Decoding reads every weight
    once per step, so bf16 serving stores them in bf16: half the bytes, and no per-step conversion.
    Training keeps float32 master weights (``param_dtype``) whatever the compute dtype.
    """
    return config.replace(scan_layers=False, param_dtype=config.dtype)


def for_serving(config: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """``serving_config(config)`` and the parameters in its layout and dtype (unstacked, cast)."""
    served = serving_config(config)
    if config.scan_layers:
        params = unstack_layers(params, config.n_layers)
    return served, jax.tree.map(lambda x: x.astype(served.storage_dtype), params)


def generate(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Prompt],
    max_new_tokens: int | Sequence[int],
    sampler: Sampler = GREEDY,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] = (),
) -> Generation:
    """Generate up to ``max_new_tokens`` (one int, or one per prompt) new tokens for each prompt.

    A row stops after its first stop token (which is not returned) or at its limit. Two compiled
    calls: prefill, then the decode loop (one ``lax.while_loop``). ``key`` defaults to key 0.
    """
    config, params = for_serving(config, params)
    batch = make_batch(config, prompts, max_new_tokens)
    stop = check_tokens(config, np.asarray(stop_tokens, np.int32).reshape(-1), "stop token")
    key = jax.random.key(0) if key is None else key
    loop = make_decode_loop(config, sampler, batch.tokens.shape[1])
    start = time.perf_counter()
    prefill = _compile_prefill(config, params, batch)
    cache = KVCache.init(config, batch.tokens.shape[0], batch.capacity)
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


@functools.cache
def _jitted_sampler(sampler: Sampler) -> Any:
    return jax.jit(sampler.__call__)


def _host_loop(
    config: ModelConfig,
    params: Params,
    sampler: Sampler,
    batch: Batch,
    logits: jax.Array,
    cache: KVCache,
    key: jax.Array,
    stop: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``_decode_loop`` in Python: the same keys, windows and bookkeeping, one jitted step per token."""
    step, sample = make_decode_step(config), _jitted_sampler(sampler)
    T, S, B = batch.tokens.shape[1], batch.capacity, batch.tokens.shape[0]
    out, length = np.zeros((B, S - T), np.int32), np.zeros((B,), np.int32)
    done, n = np.zeros((B,), bool), 0
    while n < S - T and not done.all():
        if n:
            window = next(w for w in windows(T, S) if w >= T + n - 1)
            logits, cache = step(params, cache.replace(window=window), out[:, n - 1])
        key, sub = jax.random.split(key)
        out[:, n] = np.asarray(sample(logits, sub))
        length += ~done
        done |= np.isin(out[:, n], stop) | (length >= batch.limits)
        n += 1
    return out, length, n


def generate_per_step(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Prompt],
    max_new_tokens: int | Sequence[int],
    sampler: Sampler = GREEDY,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] = (),
) -> Generation:
    """``generate`` with a Python loop over the jitted decode step (a host round-trip per token).

    Same tokens for the same key; used to time single decode steps and to check the on-device loop.
    """
    config, params = for_serving(config, params)
    batch = make_batch(config, prompts, max_new_tokens)
    stop = check_tokens(config, np.asarray(stop_tokens, np.int32).reshape(-1), "stop token")
    start = time.perf_counter()
    prefill = _compile_prefill(config, params, batch)
    compile_s = time.perf_counter() - start  # the decode step compiles during its first call
    cache = KVCache.init(config, batch.tokens.shape[0], batch.capacity)
    logits, cache, prefill_s = _prefill_batch(prefill, params, batch, cache)
    start = time.perf_counter()
    rng = jax.random.key(0) if key is None else key
    out, length, n = _host_loop(config, params, sampler, batch, logits, cache, rng, stop)
    tokens, stopped = _split_outputs(out, length, stop)
    return Generation(tokens, stopped, compile_s, prefill_s, time.perf_counter() - start, n - 1)
