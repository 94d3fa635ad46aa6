"""Decode speed inside `generate`'s on-device loop (dispatch amortised over the steps), bf16 serving.

Usage: python3 scripts/generate_speed.py [PRESET]   (default llama3.2-1b; weights are filler values)
Prints one JSON line per (batch, prompt, new tokens): the second call's decode seconds per step and the
bytes a step must read (bf16 weights + the KV cache at the midpoint of generation) per second of it.
"""

import json
import sys

import numpy as np

from jaxllm import analytic, phases, serve
from jaxllm.config import get_preset
from jaxllm.generate import generate
from jaxllm.model import param_shapes

preset = sys.argv[1] if len(sys.argv) > 1 else "llama3.2-1b"
cfg = get_preset(preset).replace(dtype="bfloat16")
params = phases.filler_params(param_shapes(cfg))
rng = np.random.default_rng(0)
for B, prompt, new in ((1, 1000, 48), (1, 1000, 176), (8, 1000, 48)):
    prompt = min(prompt, cfg.max_len // 2)
    new = min(new, cfg.max_len // 4)
    prompts = [rng.integers(0, cfg.vocab_size, prompt).tolist() for _ in range(B)]
    g = generate(cfg, params, prompts, new)
    g2 = generate(cfg, params, prompts, new)
    served = serve.serving_config(cfg)
    wbytes = analytic.param_bytes(served)
    kv = analytic.kv_cache_bytes(served, B, prompt + new // 2)
    per = g2.decode_s / max(g2.decode_steps, 1)
    print(
        json.dumps(
            dict(
                preset=preset,
                batch=B,
                prompt=prompt,
                new=new,
                compile_s=g.compile_s,
                prefill_s=g2.prefill_s,
                decode_s=g2.decode_s,
                steps=g2.decode_steps,
                s_per_step=per,
                weight_bytes=wbytes,
                kv_bytes_mid=kv,
                bytes_per_s=(wbytes + kv) / per,
            )
        ),
        flush=True,
    )
