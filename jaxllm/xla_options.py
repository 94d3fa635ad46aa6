"""XLA compile options a program is built with, by device: each one measured where it is set.

``train_options(config)`` goes to ``jax.jit(..., compiler_options=...)`` for the train step,
``serve_options()`` for the serving programs (``phase_options`` names either). Options are per
program, so a choice that helps one phase on one device leaves the others as XLA builds them.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxllm.config import ModelConfig
from jaxllm.products import cpu_features


def rolls_layers(config: ModelConfig) -> bool:
    """Whether the model's layers run as a loop (scanned, not fully unrolled)."""
    return config.scan_layers and config.scan_unroll < config.n_layers


def train_options(config: ModelConfig, backend: str | None = None) -> dict[str, Any]:
    """Compile options of ``config``'s train step on ``backend`` (default: JAX's).

    On a GPU, for layers unrolled (as ``train.training_config`` trains them there), products go to
    cuBLAS rather than XLA's Triton GEMM fusions, and kernels are launched one by one rather than
    replayed from a CUDA graph. gpt2-medium's bf16 step (B=8, T=1024) on an H200, jax 0.11.2, each
    call waited for (as ``jaxllm analyze --measure`` and ``jaxllm train`` run it), ten steps
    dispatched back to back, and the device's busy time a step:

    - XLA's options (Triton, graphs): 57.9 ms, 49.9 ms, 47.9 ms (the tied head's three Triton
      products 7.6 ms of it);
    - cuBLAS: 58.9 ms, 47.0 ms, 43.5 ms;
    - cuBLAS without graphs (these options): 47.1 ms, 45.3 ms, 44.1 ms.

    Waited for on fresh arguments, a graphed call first rewrites the graph's buffer addresses on
    the host (about 9 ms for this step's 1,500 kernels in round 9's profile) while the device
    waits; without graphs the two timings agree within 2 ms. Measured on this one H200 and model
    only: a step short enough to be bound by kernel launches may prefer graphs (not measured).
    A rolled step keeps XLA's options: these were not timed on one, though cuBLAS alone (set in
    ``XLA_FLAGS``) took gpt2-medium's rolled step from 68.1 to 61.2 ms. (Round 13 kept them off
    rolled steps because ``jaxllm.cost`` could not cost one compiled under them; round 20 found and
    fixed why: ``jaxllm.xla_hlo.gemms_as_dots``.)
    """
    if (backend or jax.default_backend()) != "gpu" or rolls_layers(config):
        return {}
    return {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_command_buffer": ""}


def serve_options(backend: str | None = None) -> dict[str, Any]:
    """Compile options of the serving programs (``jaxllm.serve``'s prefill and decode step,
    ``jaxllm.generate``'s loop, ``jaxllm.step``'s) on ``backend`` (default: JAX's).

    On a CPU with AVX-512, XLA's own loops (the one-row bf16 products among them) are vectorized
    512 bits wide rather than 256. gpt2's bf16 decode step at B=1, context 96, on the 2-core Zen 5
    VM, the two programs alternated in one process: 8.22 -> 7.91 ms (faster in 9 of 10 rounds);
    f32 at B=1, bf16 at B=8 and at B=32 with 1008 tokens cached within 1% either way. The bf16
    train step (B=4, T=256) was not faster (1.43 s with it, 1.41 s without), so training keeps
    XLA's width. Measured on that one CPU only."""
    if (backend or jax.default_backend()) != "cpu" or "avx512f" not in cpu_features():
        return {}
    return {"xla_cpu_prefer_vector_width": 512}


def phase_options(phase: str, config: ModelConfig) -> dict[str, Any]:
    """The compile options of ``phase`` ("train", "prefill" or "decode") for ``config``."""
    return train_options(config) if phase == "train" else serve_options()
