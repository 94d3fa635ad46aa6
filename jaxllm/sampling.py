"""Token sampling: greedy, temperature, top-k and top-p, as pure functions of (logits, key).

Each filter maps logits[B, V] to logits[B, V] with the excluded tokens set to -inf, so they compose:
``Sampler(temperature, top_k, top_p)`` applies temperature, then top-k, then top-p (the order of Hugging
Face's ``generate``), and draws one token per row with ``jax.random.categorical``. ``temperature=0`` is
greedy (argmax; top-k and top-p cannot change the argmax). The same key gives the same tokens.

Top-k and top-p rank tokens by the unscaled logits (a positive temperature keeps their order), and the
logits are scaled after filtering: at a huge temperature the scaled logits of a row may round to one
value (float32), which would tie every token and so keep them all.

A ``Sampler`` is a small frozen, hashable dataclass: jitted code takes it as a static argument, so each
distinct setting compiles once. Its fields are validated on construction, before anything is traced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import InputError, positive_int

# Positive temperatures below this are greedy: float32 logits divided by them overflow to inf.
TEMPERATURE_FLOOR = 1e-6
# Temperatures above this are refused: they are computed in float32, where they would be inf.
MAX_TEMPERATURE = float(np.finfo(np.float32).max)


def greedy(logits: jax.Array) -> jax.Array:
    """The most likely token of each row: logits[B, V] -> int32 [B] (ties: the lowest id)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def scale(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """logits[B, V] / temperature (a scalar or [B, 1], > 0), excluded tokens (-inf) kept at -inf.

    XLA divides by a broadcast value as a product with its reciprocal, which is 0 in float32 above
    about 8.5e37: every finite logit becomes 0 (uniform, the limit of such a temperature) and -inf
    would become nan.
    """
    return jnp.where(logits == -jnp.inf, -jnp.inf, logits / temperature)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep each row's k largest logits (and any tied with the k-th); the rest become -inf."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(
    logits: jax.Array, p: float | jax.Array, temperature: float | jax.Array = 1.0
) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling).

    logits[B, V] are unscaled; the probabilities are softmax(logits / temperature) (temperature: a
    scalar or [B, 1], > 0), ranked by the logits. A token is kept when the probability of the tokens
    ranked above it is still below p, so the top token is always kept; tokens tied with the last kept
    one are kept too.
    """
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
    probs = jax.nn.softmax(scale(ordered, temperature), axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_above < p, axis=-1, keepdims=True)  # [B, 1], >= 1
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to pick the next token: temperature (0 = greedy, as is any below ``TEMPERATURE_FLOOR``),
    then top-k, then top-p.

    ``top_k=None`` and ``top_p=None`` switch those filters off.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, int | float) or not 0 <= t <= MAX_TEMPERATURE:
            raise InputError(
                f"temperature must be a number in [0, {MAX_TEMPERATURE!r}] (float32), got {t!r}"
            )
        if t < TEMPERATURE_FLOOR:
            object.__setattr__(self, "temperature", 0.0)
        if k is not None:
            positive_int("top_k", k)
        if p is not None and (not isinstance(p, int | float) or not 0 < p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def filter(self, logits: jax.Array) -> jax.Array:
        """The logits[B, V] (float32) that are sampled from: excluded tokens at -inf, then scaled."""
        logits = logits.astype(jnp.float32)
        t = jnp.float32(self.temperature)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None and self.top_p < 1:
            logits = top_p_filter(logits, self.top_p, t)
        return scale(logits, t)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """One token per row: logits[B, V] -> int32 [B]."""
        if self.is_greedy:
            return greedy(logits)
        return jax.random.categorical(key, self.filter(logits), axis=-1).astype(jnp.int32)


GREEDY = Sampler(temperature=0.0)


def sample_rows(
    logits: jax.Array,  # [R, V]
    temperature: jax.Array,  # [R] float32, 0: greedy
    top_k: jax.Array,  # [R] int32, 0: off
    top_p: jax.Array,  # [R] float32, 1: off
    seed: jax.Array,  # [R] uint32
    count: jax.Array,  # [R] int32: tokens the row's request has sampled so far
) -> jax.Array:
    """One token per row with each row's own settings (the serving engine's requests): int32 [R].

    The same filters as ``Sampler`` (temperature, then top-k, then top-p) with per-row values. Row
    r's draw uses the key ``fold_in(key(seed[r]), count[r])``, so a request's tokens depend on its
    seed and its own progress, not on which slot or step it ran in.
    """
    greedy_tokens = greedy(logits)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]  # [R, 1]
    kept = logits.astype(jnp.float32)
    ordered = jnp.sort(kept, axis=-1)[..., ::-1]  # [R, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    kept = jnp.where(kept >= kth, kept, -jnp.inf)
    kept = top_p_filter(kept, top_p[:, None], t)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seed, count)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scale(kept, t))
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy_tokens)
