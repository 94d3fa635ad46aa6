"""The bf16 train step of a preset with its layers rolled (a scan) and unrolled, compiled and timed
the way `jaxllm analyze --measure` times a phase, with XLA's loop-corrected FLOPs beside the closed
form and the custom calls the program makes (cuBLAS GEMMs, cuDNN attention).

Usage: python3 scripts/gpu_train_variants.py [PRESET] [BATCH] [SEQ]  (default gpt2-medium 8 1024)
Prints one JSON line per variant. MFU is against the data sheet's bf16 peak of the device when
jaxllm knows it (hardware.published), else left out.
"""

import json
import sys
import time

import jax

from jaxllm import hardware, phases
from jaxllm.config import get_preset
from jaxllm.cost import analyze_compiled
from jaxllm.timing import time_compiled
from jaxllm.xla_hlo import custom_calls


def variant(name: str, config, batch: int, seq: int, peak: float | None) -> dict:
    start = time.perf_counter()
    program = phases.build(config, "train", batch, seq)
    compiled = program.jitted.lower(*program.abstract_args).compile()
    xla = analyze_compiled(compiled, time.perf_counter() - start)
    analytic = phases.analytic_view(program).flops
    timing = time_compiled(compiled, program.make_args(jax.random.key(0)), repeats=8, warmup=2)
    return dict(
        variant=name,
        batch=batch,
        seq=seq,
        compile_s=round(xla.compile_seconds, 1),
        step_s=timing.seconds_median,
        tokens_per_s=batch * seq / timing.seconds_median,
        xla_over_analytic=xla.flops / analytic,
        loop_corrected=xla.loop_corrected,
        mfu=analytic / timing.seconds_median / peak if peak else None,
        temp_gb=xla.temp_bytes / 1e9,
        custom_calls=dict(custom_calls(compiled.as_text())),
    )


def main(argv: list[str]) -> None:
    preset = argv[0] if argv else "gpt2-medium"
    batch, seq = (int(argv[1]), int(argv[2])) if len(argv) > 2 else (8, 1024)
    config = get_preset(preset).replace(dtype="bfloat16")
    sheet = hardware.published()
    peak = sheet.bf16_flops_per_s if sheet else None
    for name, cfg in (
        ("rolled", config),
        ("unrolled", config.replace(scan_unroll=config.n_layers)),
    ):
        print(json.dumps(variant(name, cfg, batch, seq, peak)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
