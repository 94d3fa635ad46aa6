"""Strict JAX for every test: no implicit rank or dtype promotion, float32 matmuls at full precision (a GPU
runs them as TF32 otherwise). A test marked ``standard_promotion`` runs under standard dtype promotion:
for bf16 gradients through ``jax.nn.dot_product_attention``, whose backward pass (JAX's, traced when
the step is lowered) mixes float32 cotangents with bfloat16 operands. On a GPU each xdist worker allocates what it uses instead of
preallocating 75% of the card, so several workers share one device, and XLA's GPU kernels are
deterministic: the scatter-add of the embedding gradient uses atomics otherwise, and the bit-exact
resume tests compare two runs."""

import importlib.util
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true"

import jax
import pytest

from jaxllm import data
from jaxllm.config import PRESETS, ModelConfig

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


# XLA's FLOPs against the closed form's (matmuls only): within 3% at the test widths on a CPU. A GPU's
# program counts more element-wise work (measured on an H200: `tiny`'s train step 8.12e6 FLOPs against
# 8.01e6 on a CPU; four of these comparisons 3.1-3.7% over the closed form), so 5% there.
FLOP_TOLERANCE = 0.03 if jax.default_backend() == "cpu" else 0.05


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A 24 KB text file: the start of the built-in corpus."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(data.default_corpus_files()[0].read_bytes()[:24_000])
    return str(path)


def tiny(family: str = "gpt2", n_kv_heads: int = 4, **changes) -> ModelConfig:
    """The ``tiny`` preset (N = 4 query heads) in the GPT-2 layout or the Llama one (RMSNorm, rotary
    positions, SwiGLU, no biases, untied head), with K = ``n_kv_heads`` and ``changes``."""
    base = PRESETS["tiny"]
    if family == "llama":
        base = base.replace(
            norm="rmsnorm", positions="rotary", mlp="swiglu", use_bias=False, tie_embeddings=False
        )
    return base.replace(n_kv_heads=n_kv_heads, **changes)
