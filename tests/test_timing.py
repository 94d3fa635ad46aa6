"""Timing: statistics of known samples, fresh arguments for donated calls."""

import jax
import jax.numpy as jnp
import pytest

from jaxllm.timing import summarize, time_compiled


def test_summary_statistics():
    t = summarize([3.0, 1.0, 2.0, 5.0, 4.0], warmup=1)
    assert t.seconds_median == 3.0 and t.seconds_min == 1.0 and t.repeats == 5
    assert t.seconds_p10 == pytest.approx(1.4) and t.seconds_p90 == pytest.approx(4.6)


def test_donated_arguments_are_fresh_each_call():
    step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    compiled = step.lower(jax.ShapeDtypeStruct((256,), jnp.float32)).compile()
    built = []

    def make_args():
        built.append(1)
        return (jnp.zeros((256,), jnp.float32),)

    timing = time_compiled(compiled, make_args, repeats=4, warmup=2)
    assert len(built) == 6 and timing.repeats == 4 and timing.seconds_median > 0
    assert timing.seconds_p10 <= timing.seconds_median <= timing.seconds_p90


def test_bad_repeats():
    with pytest.raises(ValueError, match="repeats"):
        time_compiled(lambda: None, tuple, repeats=0)
