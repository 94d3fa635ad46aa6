"""Wall-clock time of a compiled phase: compiled apart, warmed up, synchronised, repeated.

``time_compiled(compiled, make_args)`` calls ``make_args()`` before every call, outside the timed
region, so a phase whose arguments are donated (the cache, the train state) gets fresh buffers each
time; the clock stops after ``jax.block_until_ready`` on the outputs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls (after ``warmup`` untimed ones)."""

    seconds_median: float
    seconds_p10: float
    seconds_p90: float
    seconds_min: float
    repeats: int
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(seconds: list[float], warmup: int) -> Timing:
    """Median, 10th and 90th percentile and minimum of ``seconds``."""
    if not seconds:
        raise ValueError("no timed calls: repeats must be at least 1")
    arr = np.asarray(seconds, dtype=np.float64)
    p10, p50, p90 = np.percentile(arr, [10, 50, 90])
    return Timing(float(p50), float(p10), float(p90), float(arr.min()), len(seconds), warmup)


def time_compiled(
    compiled: Callable[..., Any],
    make_args: Callable[[], tuple[Any, ...]],
    repeats: int = 5,
    warmup: int = 2,
) -> Timing:
    """Times ``compiled(*make_args())``; the arguments are built (and made ready) before the clock."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    seconds = []
    for i in range(warmup + repeats):
        args = jax.block_until_ready(make_args())
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return summarize(seconds, warmup)
