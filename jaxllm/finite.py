"""Finite weights: a state with NaN or infinite parameters is never saved, called good or served."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import RunError


class NonFiniteError(RunError):
    """Parameters (or optimizer state) holding NaN or infinite values."""


@jax.jit
def _counts(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.count_nonzero(~jnp.isfinite(x)) for x in leaves]


def non_finite(tree: Any) -> dict[str, int]:
    """{leaf path: number of NaN or infinite values} for each leaf of ``tree`` that holds any."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    inexact = [(p, x) for p, x in flat if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    counts = jax.device_get(_counts([x for _, x in inexact]))
    return {jax.tree_util.keystr(p): int(n) for (p, _), n in zip(inexact, counts, strict=True) if n}


def require_finite(tree: Any, what: str) -> None:
    """NonFiniteError naming ``what``, the count and the first leaf, unless every value is finite."""
    bad = non_finite(tree)
    if bad:
        first = next(iter(bad))
        total = int(np.sum(list(bad.values())))
        raise NonFiniteError(
            f"{what} holds {total:,} NaN or infinite values in {len(bad)} arrays (first: {first})"
        )
