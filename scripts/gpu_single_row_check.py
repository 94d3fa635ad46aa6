"""One-row bf16 products asked in bf16, against the float32 product, at a test's shape (64 x 256)
and at llama3.2-1b's (2048 x 8192, 8192 x 2048): the largest error over the largest value, and
what XLA compiled the product to (a Triton GEMM, cuBLAS, or a reduction). One JSON line per shape.

Usage: python3 scripts/gpu_single_row_check.py
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

for K, N in ((64, 256), (2048, 8192), (8192, 2048)):
    x = jax.random.normal(jax.random.key(0), (1, 1, K)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (K, N)).astype(jnp.bfloat16)
    exact = jnp.einsum(
        "BTD,DF->BTF", x.astype(jnp.float32), w.astype(jnp.float32), precision="highest"
    )
    want = np.asarray(exact)
    product = jax.jit(lambda x, w: jnp.einsum("BTD,DF->BTF", x, w))
    got = np.asarray(product(x, w), np.float32)
    hlo = product.lower(x, w).compile().as_text() or ""
    row = dict(
        K=K,
        N=N,
        rel_max_err=float(np.abs(got - want).max() / np.abs(want).max()),
        bf16_ulp=2**-8,
        triton="__triton" in hlo or "triton_gemm" in hlo,
        cublas="cublas" in hlo,
        reduce=" reduce(" in hlo,
    )
    print(json.dumps(row), flush=True)
