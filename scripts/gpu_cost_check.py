"""The engine's step programs' FLOPs by XLA's generic model over the optimized HLO, and over the
program before optimization (``Lowered.cost_analysis()``, where the backend gives one), beside the
closed form (``jaxllm.stepcost``): one JSON line per program shape. The test's config and shapes
(tests/test_engine.py::test_the_step_cost_model_counts_what_xla_counts).

Usage: python3 scripts/gpu_cost_check.py
"""

import json

import jax
import jax.numpy as jnp

from jaxllm.config import PRESETS
from jaxllm.cost import analyze_compiled
from jaxllm.engine import Engine, StepRecord, _blank_input
from jaxllm.model import init_params
from jaxllm.step import make_step
from jaxllm.stepcost import step_work

cfg = PRESETS["tiny"].replace(n_kv_heads=2, d_model=128, d_ff=512, n_heads=4, max_len=128)
engine = Engine(cfg, init_params(cfg, jax.random.key(0)), slots=4, policy="chunked", chunk=32)
cache = jax.eval_shape(lambda: engine.cache)
for decode, read, P, C in ((True, False, 0, 1), (True, True, 1, 32), (False, False, 2, 16)):
    inp = _blank_input(4, P, C)
    xla = analyze_compiled(engine.program(decode, read, inp), 0.0)
    lowered = make_step(engine.config, decode, read, None).lower(engine.params, cache, inp)
    before = lowered.cost_analysis()
    record = StepRecord(decode, read, P, C, (0,) * 4 if decode else (), ((0, C),) * P, 0.0)
    work = step_work(engine.config, record, 4, 128, jnp.float32)
    row = dict(
        shape=[decode, read, P, C],
        model=work.executed_flops,
        xla_optimized=xla.flops,
        xla_unoptimized=float(before["flops"]) if before else None,
    )
    print(json.dumps(row), flush=True)
