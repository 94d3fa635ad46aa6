import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import (
    GREEDY,
    MAX_TEMPERATURE,
    TEMPERATURE_FLOOR,
    Sampler,
    sample_rows,
    top_k_filter,
    top_p_filter,
)

V = 50


@pytest.fixture(scope="module")
def logits() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (4, V)) * 3


def _draws(sampler: Sampler, logits: jax.Array, n: int = 256) -> np.ndarray:
    keys = jax.random.split(jax.random.key(2), n)
    return np.asarray(jax.jit(jax.vmap(sampler, in_axes=(None, 0)))(logits, keys))  # [n, B]


def test_temperature_zero_is_argmax(logits):
    expected = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(GREEDY(logits, jax.random.key(0)), expected)
    np.testing.assert_array_equal(
        Sampler(0.0, top_k=3, top_p=0.5)(logits, jax.random.key(9)), expected
    )


def test_top_k_never_picks_outside_the_top_k(logits):
    draws = _draws(Sampler(1.0, top_k=3), logits)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for b in range(logits.shape[0]):
        assert set(draws[:, b]) <= set(top3[b])
    assert len(set(draws[:, 0])) > 1  # it does sample, not just take the argmax


def test_top_p_keeps_the_smallest_set_reaching_p(logits):
    p = 0.6
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    kept = np.isfinite(np.asarray(top_p_filter(logits, p)))
    for b in range(probs.shape[0]):
        order = np.argsort(-probs[b])
        # The smallest prefix with mass >= p.
        n = int(np.searchsorted(np.cumsum(probs[b][order]), p) + 1)
        assert set(np.flatnonzero(kept[b])) == set(order[:n])
    draws = _draws(Sampler(1.0, top_p=p), logits)
    assert all(kept[b, draws[:, b]].all() for b in range(probs.shape[0]))


def test_filters_compose_and_top_k_filter_masks(logits):
    masked = np.asarray(top_k_filter(logits, 5))
    assert (np.isfinite(masked).sum(axis=-1) == 5).all()
    both = np.isfinite(np.asarray(Sampler(1.0, top_k=5, top_p=0.3).filter(logits)))
    assert (both <= np.isfinite(masked)).all()


def test_same_seed_same_tokens_and_temperature_spreads(logits):
    s = Sampler(1.0)
    a, b = s(logits, jax.random.key(5)), s(logits, jax.random.key(5))
    np.testing.assert_array_equal(a, b)
    cold = _draws(Sampler(0.05), logits)
    np.testing.assert_array_equal(cold[0], np.argmax(np.asarray(logits), axis=-1))
    assert len(set(_draws(Sampler(5.0), logits)[:, 0])) > len(set(cold[:, 0]))


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e39}, "temperature must be a number in [0, 3.4028234663852886e+38]"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_settings_raise(kwargs, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        Sampler(**kwargs)


def test_sampler_is_hashable_static_config():
    assert hash(Sampler(1.0, 5, 0.9)) == hash(Sampler(1.0, 5, 0.9))
    assert jnp.dtype(GREEDY(jnp.zeros((2, V)), jax.random.key(0)).dtype) == jnp.int32


@pytest.mark.parametrize("t", [1e-38, 1e-45, TEMPERATURE_FLOOR / 2])
def test_a_temperature_below_the_floor_is_greedy(logits, t):
    sampler = Sampler(t)
    assert sampler == GREEDY
    expected = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(_draws(sampler, logits, 8), np.broadcast_to(expected, (8, 4)))
    assert Sampler(TEMPERATURE_FLOOR).temperature == TEMPERATURE_FLOOR


@pytest.mark.parametrize("t", [1e37, 1e38, MAX_TEMPERATURE])
def test_top_k_and_top_p_keep_the_top_logits_at_a_huge_temperature(logits, t):
    """Scaled by such a temperature every logit rounds to 0 (float32): the filters must rank the
    unscaled ones. top_k=1 is greedy; top_p=0.51 of a near-uniform row keeps its top 26 of 50."""
    expected = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(_draws(Sampler(t, top_k=1), logits, 8)[0], expected)
    kept = np.isfinite(np.asarray(Sampler(t, top_p=0.51).filter(logits)))
    top26 = np.argsort(-np.asarray(logits), axis=-1)[:, :26]
    assert all(set(np.flatnonzero(kept[b])) == set(top26[b]) for b in range(logits.shape[0]))
    rows = logits.shape[0]
    per_row = sample_rows(
        logits,
        jnp.full(rows, t, jnp.float32),
        jnp.ones(rows, jnp.int32),
        jnp.ones(rows, jnp.float32),
        jnp.arange(rows, dtype=jnp.uint32),
        jnp.zeros(rows, jnp.int32),
    )
    np.testing.assert_array_equal(per_row, expected)
