"""Strict JAX for every test: no implicit rank promotion, float32 matmuls at full precision (a GPU
runs them as TF32 otherwise). On a GPU each xdist worker allocates what it uses instead of
preallocating 75% of the card, so several workers share one device."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)
