"""How the model's projections are computed on each device, in the letters of ``jaxllm.model``.

- ``project``: x against an input-major (in_out) kernel, the layout of training everywhere and of
  serving off the CPU;
- ``project_out_in``: x against an output-major kernel, the CPU's serving layout;
- ``add_bias``: a projection's bias.

Each computes in the compute dtype, accumulated in float32. On a CPU with bf16 arithmetic, a bf16
product of several rows runs as ``library_matmul``, whose backward pass keeps every product in the
form XLA:CPU hands to its library (2-core Zen 5 VM with AVX512-BF16: gpt2's bf16 train step, B=4,
T=256, 2.41 -> 1.69 s; with the biases summed in float32 as below, 2.26 -> 1.51 s). On a CPU
whose arithmetic has no bf16 (or fp16) instructions, a product of more than ``WIDEN_ROWS`` rows in
that dtype is computed on its operands widened to float32 (``operand_dtype``; ``jaxllm.attention`` widens its dots alike).
That is the same product: the operands are rounded to the narrow dtype first, and a product of two
bf16 (or fp16) numbers is exact in float32. XLA:CPU's narrow products run below its float32 ones
there (measured on the 2-core AVX2 VM, [1024, 768] x [768, 3072]: bf16 106 GFLOP/s, widened 171,
float32 182). gpt2's bf16 train step (B=4, T=256, 1,024 rows; one process, variants alternated,
medians of five) took 6.62 s with XLA's bf16 products, 5.71 s widened, 5.49 s with the biases
summed in float32 too (``add_bias``) and 5.32 s with the attention's dots widened; its bf16
prefill (B=1, T=1024) 2.06 s, 1.42 s widened, 1.38 s with the attention's.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import cast

import jax
import jax.numpy as jnp

# CPU features (Linux /proc/cpuinfo names, x86 and aarch64) that give a narrow dtype's arithmetic.
NATIVE_FEATURES = {
    jnp.dtype(jnp.bfloat16): frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    jnp.dtype(jnp.float16): frozenset({"avx512_fp16", "amx_fp16", "asimdhp"}),
}
# Rows (B·T) for which an output-major product runs weight-major, by the compute dtype's width in
# bytes: see project_out_in.
WEIGHT_MAJOR_ROWS = {4: range(2, 257), 2: range(32, 257)}
# Fewer rows for which a library (bf16) product runs weight-major where the kernel's input is longer
# than its output (an MLP's down projection): see weight_major.
LONG_INPUT_ROWS = range(2, 32)
# A narrow product of more rows (B·T) than this widens where ``widens_products``. Fewer rows (a
# decode step, a short prompt) keep the narrow product: widening converts the whole weight on every
# call, which a few rows do not repay. 256 is where output-major products leave their weight-major
# form; the crossover was not measured finer.
WIDEN_ROWS = 256
# Narrow dtypes whose products with float32 results XLA:CPU hands to its library (YNNPACK takes bf16
# operands; its fp16 products are not fast yet), on a CPU with their arithmetic.
LIBRARY_DTYPES = frozenset({jnp.dtype(jnp.bfloat16)})


@functools.cache
def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields in Linux's cpuinfo (``model name``, ``flags``, ...); empty
    where that cannot be read (another OS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The host CPU's feature names (the ``flags`` or ``Features`` line of Linux's cpuinfo); empty
    where that cannot be read (another OS)."""
    fields = cpu_info(cpuinfo)
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def _native_arithmetic(dtype: jnp.dtype) -> bool | None:
    """On a CPU whose features are known, whether they give arithmetic in the narrow ``dtype``;
    None off a CPU, for float32, or where the features cannot be read."""
    features = cpu_features()
    native = NATIVE_FEATURES.get(jnp.dtype(dtype))
    if jax.default_backend() != "cpu" or native is None or not features:
        return None
    return bool(features & native)


def widens_products(dtype: jnp.dtype) -> bool:
    """Whether narrow (bf16, fp16) work is computed on operands widened to float32 (a product of
    more than ``WIDEN_ROWS`` rows, the attention's dots, a bias's sum): on a CPU whose features are
    known and give no arithmetic in ``dtype``."""
    return _native_arithmetic(dtype) is False


def operand_dtype(dtype: jnp.dtype, rows: int) -> jnp.dtype:
    """The dtype a product of ``rows`` rows (B·T) in ``dtype`` takes its operands in: float32 for
    more than ``WIDEN_ROWS`` rows where ``widens_products``, else ``dtype``."""
    widen = rows > WIDEN_ROWS and widens_products(dtype)
    return jnp.dtype(jnp.float32 if widen else dtype)


def operands(dtype: jnp.dtype, rows: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """A product's operands: each array rounded to ``dtype``, then in ``operand_dtype(dtype,
    rows)`` (widened to float32 for the same values where that says so)."""
    work = operand_dtype(dtype, rows)
    return tuple(a.astype(dtype).astype(work) for a in arrays)


def library_products(dtype: jnp.dtype) -> bool:
    """Whether products in ``dtype`` with several rows run through ``library_matmul``: on a CPU
    whose features give bf16 arithmetic (``LIBRARY_DTYPES``)."""
    return jnp.dtype(dtype) in LIBRARY_DTYPES and _native_arithmetic(dtype) is True


def _nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, K] x [K, N] -> [M, N] float32."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """[M, K] x [N, K] -> [M, N] float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _transposed(a: jax.Array) -> jax.Array:
    """[K, M] -> [M, K], written out through a unit axis ([K, M] -> [M, 1, K] -> [M, K]): XLA folds
    a transpose op into the product it meets, as a transposed operand or result that its library
    does not take (a transposed bf16 result fails at run time: "Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32"), but not this one."""
    K, M = a.shape
    return a[None].transpose(2, 0, 1).reshape(M, K)


def _tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """[K, M] x [K, N] -> [M, N] float32, with aᵀ written out first (``_transposed``)."""
    return _nn(_transposed(a), b)


def _weight_grad(x: jax.Array, g: jax.Array, out_major: bool) -> jax.Array:
    """The gradient of w in ``library_matmul``: x [R, I] and g [R, O] -> [O, I] (``out_major``)
    or [I, O], float32. The operand of fewer columns is the one transposed; the result is then
    transposed where it comes out in the other order. Against transposing x always, gpt2's bf16
    train step (B=4, T=256; 2-core Zen 5 VM, alternated in one process, 11 of 12 pairs faster):
    1.414 -> 1.389 s with the MLP's down projection transposing g [R, 768] rather than its input
    [R, 3072], 1.387 -> 1.354 s with the tied head transposing x [R, 768] rather than g [R, 50257]."""
    if x.shape[1] <= g.shape[1]:
        dw = _tn(x, g)  # [I, O]
        return _transposed(dw) if out_major else dw
    dw = _tn(g, x)  # [O, I]
    return dw if out_major else _transposed(dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def library_matmul(x: jax.Array, w: jax.Array, out_major: bool) -> jax.Array:
    """x [R, I] against w [I, O] (``out_major``: [O, I]) -> [R, O] float32, for XLA:CPU's library.

    XLA:CPU hands a bf16 product with a float32 result to its YNNPACK library when the operands
    are [M, K] x [K, N] or [M, K] x [N, K]; any other form, and a product with a float32 operand,
    it computes on operands converted to float32, at half the rate (2-core Zen 5 VM, AVX512-BF16:
    900 against 380-430 GFLOP/s). Autodiff of the product gives both: its cotangent is float32
    (the transpose of rounding the result) and the weight's gradient, xᵀ·g, takes a transposed
    left operand. So the backward pass here rounds the cotangent to x's dtype (exact: it was a
    bf16 value) and writes a transposed operand out (``_weight_grad``)."""
    return matmul(x, w, out_major)


def matmul(x: jax.Array, w: jax.Array, out_major: bool) -> jax.Array:
    """x [R, I] against w [I, O] (``out_major``: [O, I]) -> [R, O] float32, in the forms XLA:CPU
    hands to its library (``library_matmul``) for narrow operands."""
    return _nt(x, w) if out_major else _nn(x, w)


def _library_fwd(x: jax.Array, w: jax.Array, out_major: bool) -> tuple[jax.Array, tuple]:
    return library_matmul(x, w, out_major), (x, w)


def _library_bwd(out_major: bool, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    return matmul_grads(x, w, g, out_major)


def matmul_grads(
    x: jax.Array, w: jax.Array, g: jax.Array, out_major: bool
) -> tuple[jax.Array, jax.Array]:
    """The gradients of x [R, I] and w [I, O] (``out_major``: [O, I]) in ``library_matmul``'s
    product, from its result's gradient g [R, O], rounded first to x's dtype (exact for a gradient
    that a narrow product's rounding passed back); in x's and w's dtypes. The weight's gradient
    takes ``_weight_grad``'s form where XLA:CPU hands the product to its library, XLA's own
    elsewhere."""
    g = g.astype(x.dtype)  # [R, O]
    dx = _nn(g, w) if out_major else _nt(g, w)  # [R, I]
    if library_products(x.dtype):
        dw = _weight_grad(x, g, out_major)
    elif out_major:
        dw = _einsum32("RO,RI->OI", g, x)
    else:
        dw = _einsum32("RI,RO->IO", x, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


library_matmul.defvjp(_library_fwd, _library_bwd)


def _einsum32(eqn: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(eqn, a, b)`` accumulated in float32: a float32 result."""
    return jnp.einsum(eqn, a, b, preferred_element_type=jnp.float32)


def float32_einsum(eqn: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(eqn, a, b)`` accumulated in float32, a float32 result; of narrow operands as
    ``rounded_einsum``, whose backward pass keeps its products narrow (gpt2's bf16 train step on
    the Zen 5 VM, alternated, the attention's dots so: 1.52 -> 1.48 s)."""
    if jnp.dtype(a.dtype).itemsize < 4:
        return cast(jax.Array, rounded_einsum(eqn, a, b))
    return _einsum32(eqn, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def rounded_einsum(eqn: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(eqn, a, b)`` of narrow operands, accumulated in float32 (a float32 result), whose
    backward pass rounds the cotangent to a's dtype: its two products then take narrow operands,
    which XLA:CPU hands to its library where plain autodiff gives them a float32 cotangent and
    XLA converts both operands to float32 (the attention's dots: ``jaxllm.attention``). Each
    index of ``eqn`` must appear in two of its three terms."""
    return _einsum32(eqn, a, b)


def _rounded_fwd(eqn: str, a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple]:
    return rounded_einsum(eqn, a, b), (a, b)


def _rounded_bwd(eqn: str, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = res
    (ia, ib), io = eqn.split("->")[0].split(","), eqn.split("->")[1]
    g = g.astype(a.dtype)
    da = _einsum32(f"{io},{ib}->{ia}", g, b)
    db = _einsum32(f"{ia},{io}->{ib}", a, g)
    return da.astype(a.dtype), db.astype(b.dtype)


rounded_einsum.defvjp(_rounded_fwd, _rounded_bwd)


def _library_project(eqn: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``einsum(eqn, x, kernel)`` in float32 as one ``library_matmul``: x [B, T, *in] and a kernel
    [*in, *out] or [*out, *in] (the tied head's [V, D])."""
    (lhs, spec), out = eqn.split("->")[0].split(","), eqn.split("->")[1]
    n_in = sum(axis in lhs for axis in spec)
    out_major = spec[0] not in lhs
    out_axes = spec[: len(spec) - n_in] if out_major else spec[n_in:]
    if out != lhs[:2] + out_axes:
        raise ValueError(f"{eqn}: the output is not x's two leading axes then the kernel's others")
    out_shape = kernel.shape[: len(out_axes)] if out_major else kernel.shape[n_in:]
    rows, inner = math.prod(x.shape[:2]), math.prod(x.shape[2:])
    w = kernel.reshape(-1, inner) if out_major else kernel.reshape(inner, -1)
    y = cast(jax.Array, library_matmul(x.reshape(rows, inner), w, out_major))
    return y.reshape(*x.shape[:2], *out_shape)


def widens_single_rows(dtype: jnp.dtype) -> bool:
    """Whether XLA widens a whole narrow weight to float32 for a product with one row (XLA:CPU)."""
    return jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu"


def single_row_as_two(dtype: jnp.dtype) -> bool:
    """Whether ``project`` computes a product of one row as one of two rows (the row twice, the
    first result kept), so that XLA compiles a matrix product rather than a vector's.

    Off a CPU, always (measured on a GPU; no TPU was measured): XLA:GPU rewrites a vector-matrix
    product of fewer than 10^7 weight elements as an elementwise product written out in full and a
    separate sum (xla/service/gpu/transforms/dot_strength_reduction.cc), where two rows stay a
    GEMM. On an H200 (round 20, bf16 weights, 1024 tokens cached, a step inside ``generate``, one
    pass): llama3.2-1b at B=1 1.86 -> 1.42 ms, gpt2-medium 1.52 -> 1.19 ms. On a CPU, for narrow
    dtypes: there one row takes a path that widens the whole weight to float32 on every call
    (``widens_single_rows``)."""
    return jax.default_backend() != "cpu" or widens_single_rows(dtype)


def project(eqn: str, x: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``einsum(eqn, x, kernel)`` in ``dtype``, accumulated in float32; x's two leading axes are
    B and T. A single row (B = T = 1: a decode step of one sequence) is computed as two where
    ``single_row_as_two`` says so (on a CPU, gpt2 bf16 decode B=1: 48.9 -> 38.7 ms).

    On a CPU the product asks XLA for a float32 result, rounded after: the f32 accumulation took
    gpt2's bf16 decode step at B=8 from 83 to 63 ms there. A narrow product of more than
    ``WIDEN_ROWS`` rows runs on widened operands (``operand_dtype``).

    A GPU's GEMMs accumulate in float32 whatever the result type, so there the product is asked in
    ``dtype``: a float32 result would make its gradient float32 too (the transpose of the
    rounding), and the backward products run on float32 operands. On an H200, gpt2-medium's bf16
    train step (B=8, T=1024) ran its backward products as TF32 GEMMs and spent 9 ms of 109
    converting; asked in bf16, the step took 70 ms (jax 0.11.2).
    """
    single = x.shape[:2] == (1, 1) and single_row_as_two(dtype)
    if single:
        x = jnp.concatenate([x, x])
    if jax.default_backend() != "cpu":
        y = jnp.einsum(eqn, x.astype(dtype), kernel.astype(dtype))
    else:
        rows = x.shape[0] * x.shape[1]
        x, kernel = operands(dtype, rows, x, kernel)
        if rows > 1 and library_products(x.dtype):
            y = _library_project(eqn, x, kernel)
        else:
            y = _einsum32(eqn, x, kernel)
    return (y[:1] if single else y).astype(dtype)


def sums_bias_in_float32(dtype: jnp.dtype, rows: int) -> bool:
    """Whether ``add_bias`` forms a narrow sum over ``rows`` rows in float32: on a CPU, for more
    than ``WIDEN_ROWS`` rows (a decode step's few rows keep XLA's narrow sum: gpt2's bf16 step at
    B=32 over 1008 cached tokens, alternated on the Zen 5 VM, took 63.3 ms with it, 65.3 without)."""
    narrow = jnp.dtype(dtype).itemsize < 4
    return narrow and rows > WIDEN_ROWS and jax.default_backend() == "cpu"


def add_bias(y: jax.Array, bias: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """y [..., *bias.shape] + bias, in ``dtype``. On a CPU, over many rows (``sums_bias_in_float32``),
    a narrow sum is formed in float32 and rounded: the bias's gradient, a sum over every row, then
    reduces float32 values, which XLA:CPU hands to its YNNPACK library, where a bf16 one becomes
    window reductions in XLA's own loops. gpt2's bf16 train step (B=4, T=256): 75 of them; on the
    2-core AVX2 VM 356 ms in its profile, the step 5.71 -> 5.49 s; on the Zen 5 VM 1.67 -> 1.54 s."""
    rows = math.prod(y.shape[: y.ndim - bias.ndim])
    bias = bias.astype(dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    # The same sum either way: XLA:CPU adds bf16 arrays in float32 and rounds.
    if sums_bias_in_float32(dtype, rows):
        return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
    return y + bias


def weight_major(dtype: jnp.dtype, rows: int, n_out: int, n_in: int) -> bool:
    """Whether ``project_out_in`` applies an [O, I] kernel (O = ``n_out``, I = ``n_in``) to
    ``rows`` rows weight-major: for the row counts of ``WEIGHT_MAJOR_ROWS``, and in a library
    product (``library_products``) of ``LONG_INPUT_ROWS`` rows where I > O.

    The latter measured on the Zen 5 VM, gpt2's bf16 decode step at context 96 with its MLP's down
    projection ([768, 3072]) weight-major, against every product row-major, the two programs
    alternated in one process (rounds of ten steps, medians): B=2 12.39 -> 11.75 ms, B=4 13.86 ->
    13.07, B=8 17.21 -> 16.50 (faster in 18 of 20 rounds), B=16 21.46 -> 20.62. Every product
    weight-major instead was slower at those row counts (B=8 and B=16: +16% and +5%); at B=32
    (every product weight-major already) the rule changes nothing measurable (31.84 against 31.71
    ms)."""
    if rows in WEIGHT_MAJOR_ROWS.get(jnp.dtype(dtype).itemsize, ()):
        return True
    return rows in LONG_INPUT_ROWS and n_in > n_out and library_products(dtype)


def project_out_in(x: jax.Array, kernel: jax.Array, n_in: int, dtype: jnp.dtype) -> jax.Array:
    """x [..., *in] against an output-major kernel [*out, I] (I = the product of the ``n_in`` input
    axes) -> [..., *out], in ``dtype``, accumulated in float32 (``kernel_order="out_in"``: the
    CPU's serving layout).

    For the row counts R where ``weight_major`` says so the kernel is applied weight-major, [O, I] x
    [R, I] -> [O, R], then transposed (the optimization barrier keeps XLA from folding the transpose
    back into the product); other counts run row-major, [R, I] x [O, I] -> [R, O], except one
    narrow (bf16) row on a CPU: [1, I] x transpose([O, I]), which XLA:CPU compiles to a loop over
    the weight's rows that reads it in bf16 (its library product converts the whole weight to
    float32 first). Measured on twelve gpt2 MLPs, against the in_out product: f32 1 row 9.5 -> 6.8
    ms (row-major), 8 rows 21.4 -> 10.2 ms, 32 rows 43.7 -> 25.8 ms (weight-major; even from 256
    rows on); bf16 8 rows 24.9 -> 18.4 ms (row-major; weight-major 28.3), 32 rows 52.9 -> 42.8 ms
    (weight-major). bf16 one row, against the row-major product of two rows: twelve [3072, 768]
    kernels 5.2 -> 2.7 ms, twelve [768, 3072] 4.0 -> 2.6 ms, gpt2's tied head 6.6 -> 3.0 ms
    (about 20 GB/s, 2-core VM).
    """
    lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
    out = kernel.shape[:-1]
    if kernel.shape[-1] != math.prod(inner):
        raise ValueError(f"kernel {kernel.shape} does not take inputs {x.shape} over {n_in} axes")
    rows = math.prod(lead)
    # [R, I] and [O, I]
    x2, w = operands(dtype, rows, x.reshape(rows, -1), kernel.reshape(math.prod(out), -1))
    if weight_major(dtype, rows, w.shape[0], w.shape[1]):
        y = jax.lax.optimization_barrier(_nt(w, x2)).T  # [O, R] -> [R, O]
    elif rows == 1 and widens_single_rows(dtype):
        # [1, I] x transpose([O, I]): XLA:CPU fuses a vector-matrix product with its operand's
        # transpose into one loop over the weight's rows, reading the narrow weight as it is.
        y = _nn(_one_index(x2, n_in), w.T)  # [1, O]
    else:
        y = _nt(x2, w)  # [R, O]
    return y.astype(dtype).reshape(*lead, *out)


def _one_index(row: jax.Array, n_in: int) -> jax.Array:
    """row [1, I], merged from ``n_in`` axes, as an array of one axis for XLA:CPU's product loop.

    The loop reads each operand through the shape it was made in: a row merged from [N, H], or a
    kernel [D, N, H], is indexed as [k // H, k % H] at each of the I steps of each of the O sums.
    So output-major kernels store their input axes merged (``jaxllm.model.output_major``), and a
    row of several axes is gathered by ``iota`` (the same row), which XLA does not fold away.
    gpt2's bf16 output projection, one row against a [768, 768] kernel: 121 us with the row made
    in [12, 64], 33 us gathered. gpt2's bf16 decode step at B=1 (context 96, Zen 5 VM, the two
    programs alternated): 7.97 ms with this projection as two rows of XLA's library product,
    7.73 ms as this loop (faster in 7 of 10 rounds)."""
    if n_in == 1:
        return row
    index = jnp.arange(row.shape[1])
    return jnp.take(row, index, axis=1, unique_indices=True, indices_are_sorted=True)
