"""The engine's step programs' FLOPs by XLA's generic model over the optimized HLO, and over the
program before optimization (``Lowered.cost_analysis()``, where the backend gives one), beside the
closed form (``jaxllm.stepcost``): one JSON line per program shape. The test's config and shapes
(tests/test_engine.py::test_the_step_cost_model_counts_what_xla_counts).

Then a scanned (rolled) train step, as tests/test_train.py's loop test builds it, compiled with the
options the unrolled step gets on a GPU (``xla_options.train_options``): its loop-corrected FLOPs,
whether XLA's generic model could cost it and why not (round 13's H200 fell back to the GPU's own
count there), and its optimized HLO written to HLO_OUT (gzip) when given.

Usage: python3 scripts/gpu_cost_check.py [HLO_OUT]
"""

import gzip
import json
import sys

import jax
import jax.numpy as jnp

from jaxllm import train, xla_options
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

rolled = PRESETS["tiny"].replace(n_layers=3, remat="full")
options = xla_options.train_options(rolled.replace(scan_unroll=3), backend="gpu")
optimizer = train.make_optimizer()
state = jax.eval_shape(lambda: train.init_state(rolled, optimizer, jax.random.key(0)))
batch = jax.ShapeDtypeStruct((2, 17), jnp.int32)
for name, opts in (("xla", {}), ("gpu_train_options", options)):
    xla_options.train_options = lambda config, backend=None, opts=opts: opts
    compiled = train.make_train_step(rolled, optimizer).lower(state, batch).compile()
    cost = analyze_compiled(compiled, 0.0)
    row = dict(rolled_train=name, flops=cost.flops, raw_flops=cost.raw_flops, loops=cost.loops)
    print(json.dumps(row | dict(corrected=cost.loop_corrected, note=cost.loop_note[:600])))
    if len(sys.argv) > 1 and opts:
        with gzip.open(sys.argv[1], "wt") as f:
            f.write(compiled.as_text() or "")
