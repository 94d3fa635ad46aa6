import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from jaxllm import products, train
from jaxllm.model import init_params
from jaxllm.products import (
    add_bias,
    cpu_features,
    library_matmul,
    library_products,
    project,
    project_out_in,
    rounded_einsum,
    widens_products,
)

CPU = jax.default_backend() == "cpu"
on_cpu = pytest.mark.skipif(not CPU, reason="widening is a CPU choice")


def _features(monkeypatch: pytest.MonkeyPatch, names: str) -> None:
    monkeypatch.setattr(products, "cpu_features", lambda: frozenset(names.split()))


def test_cpu_features_read_x86_flags_and_arm_features(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimdhp bf16\n")
    assert cpu_features(x86) == {"fpu", "avx2", "fma"}
    assert cpu_features(arm) == {"fp", "asimd", "asimdhp", "bf16"}
    assert cpu_features(tmp_path / "missing") == frozenset()


@on_cpu
@pytest.mark.parametrize(
    ("features", "dtype", "widens"),
    [
        ("avx avx2 fma", jnp.bfloat16, True),
        ("avx avx2 fma", jnp.float16, True),
        ("avx2 avx512f avx512_bf16", jnp.bfloat16, False),
        ("avx2 amx_bf16", jnp.bfloat16, False),
        ("avx2 avx512_bf16", jnp.float16, True),
        ("fp asimd bf16", jnp.bfloat16, False),
        ("avx avx2 fma", jnp.float32, False),
        ("", jnp.bfloat16, False),  # features unknown (not Linux): XLA's own narrow product
    ],
)
def test_narrow_products_widen_where_the_cpu_has_no_such_arithmetic(
    monkeypatch, features, dtype, widens
):
    _features(monkeypatch, features)
    assert widens_products(dtype) is widens


def _dot_operand_types(fn, *args) -> set[str]:
    """The element types of the operands of the dots in fn's lowered (StableHLO) program."""
    lines = jax.jit(fn).lower(*args).as_text().splitlines()
    operands = [line.split(": (")[1].split(") ->")[0] for line in lines if "dot_general" in line]
    return {t.rsplit("x", 1)[1].rstrip(">") for types in operands for t in types.split(", ")}


@on_cpu
@pytest.mark.parametrize("features", ["avx2 fma", "avx2 avx512_bf16"], ids=["widened", "narrow"])
def test_a_widened_product_is_the_narrow_product(monkeypatch, features):
    """Either way, the product of the bf16-rounded operands accumulated in float32, rounded to
    bf16 (a bf16 product is exact in float32); widened, XLA's dot takes float32 operands."""
    _features(monkeypatch, features)
    x = jax.random.normal(jax.random.key(0), (2, 160, 256))  # 320 rows: more than WIDEN_ROWS
    w = jax.random.normal(jax.random.key(1), (256, 96))
    fn = functools.partial(project, "BTD,DF->BTF", dtype=jnp.bfloat16)
    y = fn(x, w)
    rounded = [np.asarray(a.astype(jnp.bfloat16), np.float64) for a in (x, w)]
    want = np.einsum("btd,df->btf", *rounded)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-8, atol=1e-6)
    assert _dot_operand_types(fn, x, w) == ({"f32"} if features == "avx2 fma" else {"bf16"})


@on_cpu
def test_a_product_of_few_rows_stays_narrow(monkeypatch):
    """A decode step's few rows do not repay widening the whole weight on every call."""
    _features(monkeypatch, "avx2 fma")
    x = jnp.ones((1, products.WIDEN_ROWS, 64), jnp.bfloat16)
    w = jnp.ones((64, 32), jnp.bfloat16)
    fn = functools.partial(project, "BTD,DF->BTF", dtype=jnp.bfloat16)
    assert _dot_operand_types(fn, x, w) == {"bf16"}
    assert _dot_operand_types(fn, jnp.ones((1, products.WIDEN_ROWS + 1, 64)), w) == {"f32"}


@on_cpu
@pytest.mark.parametrize("rows", [products.WIDEN_ROWS + 4, 12], ids=["many_rows", "few_rows"])
def test_a_bias_adds_the_same_either_way_and_its_gradient_sums_the_rows(rows):
    """The sum is bf16's either way; over many rows the bias's gradient sums them in float32 (one
    rounding to bf16 at the end), where XLA's bf16 sum rounds as it goes."""
    y = jax.random.normal(jax.random.key(0), (2, rows // 2, 8)).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(1), (8,))
    out = add_bias(y, bias, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    want = y + bias.astype(jnp.bfloat16)[None, None]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert products.sums_bias_in_float32(jnp.bfloat16, rows) is (rows > products.WIDEN_ROWS)
    cotangent = jax.random.normal(jax.random.key(2), y.shape).astype(jnp.bfloat16)
    grad = jax.grad(lambda b: jnp.vdot(add_bias(y, b, jnp.bfloat16), cotangent).real)(bias)
    total = np.asarray(cotangent, np.float64).sum(axis=(0, 1))
    rtol = 2**-8 if rows > products.WIDEN_ROWS else 2**-5
    np.testing.assert_allclose(np.asarray(grad, np.float64), total, rtol=rtol, atol=1e-3)


@on_cpu
def test_bf16_training_gives_the_same_loss_and_gradients_widened(monkeypatch):
    """A tiny bf16 model's loss and gradients, products widened against XLA's bf16 products: the
    same sums in another order (bf16 rounding of the activations apart)."""
    cfg = tiny("gpt2", 4, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (8, 65), 0, cfg.vocab_size)  # 512 rows
    out = {}
    for features in ("avx2 fma", "avx2 avx512_bf16"):
        _features(monkeypatch, features)
        out[features] = jax.jit(functools.partial(train.loss_and_grads, config=cfg))(params, batch)
    (loss_w, grads_w), (loss_n, grads_n) = out.values()
    np.testing.assert_allclose(float(loss_w), float(loss_n), rtol=1e-2)
    for a, b in zip(jax.tree.leaves(grads_w), jax.tree.leaves(grads_n), strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=0.1, atol=0.05 * np.abs(b).max() + 1e-6
        )


@pytest.mark.parametrize("order", ["in_out", "out_in"])
def test_a_single_bf16_row_is_projected_without_widening_the_weight(order):
    """One row (a decode step of one sequence) in bf16, against either kernel order: the
    f32-accumulated product, rounded to bf16; on a CPU, XLA's program never holds the weight
    converted to float32."""
    x = jax.random.normal(jax.random.key(0), (1, 1, 64)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (64, 256)).astype(jnp.bfloat16)
    if order == "in_out":
        fn = functools.partial(project, "BTD,DF->BTF", dtype=jnp.bfloat16)
    else:
        w = w.T  # [F, D]
        fn = functools.partial(project_out_in, n_in=1, dtype=jnp.bfloat16)
    y = fn(x, w)
    eqn = "BTD,DF->BTF" if order == "in_out" else "BTD,FD->BTF"
    want = jnp.einsum(eqn, x.astype(jnp.float32), w.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 1, 256)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)
    if jax.default_backend() == "cpu":  # XLA's temporaries: less than a float32 copy of w
        memory = jax.jit(fn).lower(x, w).compile().memory_analysis()
        assert memory is not None
        assert memory.temp_size_in_bytes < w.size * 4


@pytest.mark.parametrize(
    ("backend", "dtype", "rows"),
    [("gpu", "bfloat16", 2), ("gpu", "float32", 2), ("cpu", "float32", 1)],
)
def test_one_row_is_computed_as_two_on_a_gpu(monkeypatch, backend, dtype, rows):
    """A decode step's one row: on a GPU the program's product takes the row twice (XLA:GPU writes
    a vector's product out elementwise); on a CPU a float32 row stays one. The result is the one
    row's product either way."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x = jax.random.normal(jax.random.key(0), (1, 1, 64)).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (64, 256)).astype(dtype)
    fn = functools.partial(project, "BTD,DF->BTF", dtype=dtype)
    dots = [e for e in jax.make_jaxpr(fn)(x, w).eqns if e.primitive.name == "dot_general"]
    assert [d.invars[0].aval.shape[0] for d in dots] == [rows]
    want = jnp.einsum("BTD,DF->BTF", x.astype(jnp.float32), w.astype(jnp.float32))
    y = fn(x, w)
    assert y.dtype == dtype and y.shape == (1, 1, 256)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)


def test_an_output_major_kernel_must_take_the_inputs():
    """A kernel whose trailing axes are not x's contracted ones is refused, naming both shapes."""
    with pytest.raises(ValueError, match=r"kernel \(8, 4\) does not take inputs \(2, 3, 8\)"):
        project_out_in(jnp.ones((2, 3, 8)), jnp.ones((8, 4)), 1, jnp.float32)


@on_cpu
@pytest.mark.parametrize(
    ("features", "dtype", "library"),
    [
        ("avx2 avx512f avx512_bf16", jnp.bfloat16, True),
        ("fp asimd bf16", jnp.bfloat16, True),
        ("avx avx2 fma", jnp.bfloat16, False),
        ("avx2 avx512_fp16", jnp.float16, False),  # XLA's library has no fast fp16 product
        ("avx2 avx512_bf16", jnp.float32, False),
        ("", jnp.bfloat16, False),
    ],
)
def test_library_products_where_the_cpu_has_bf16_arithmetic(monkeypatch, features, dtype, library):
    _features(monkeypatch, features)
    assert library_products(dtype) is library


@pytest.mark.parametrize("out_major", [False, True], ids=["in_out", "out_major"])
@pytest.mark.parametrize(("I", "O"), [(32, 24), (24, 32)], ids=["I > O", "I < O"])
def test_library_matmul_and_its_gradients_are_the_products(out_major, I, O):
    """Value and both gradients against autodiff of the float32 product of the same bf16 numbers
    (each a float32-accumulated product of bf16 operands: the same sums in another order), and
    every product of the backward pass takes bf16 operands; the weight's gradient either way
    round (the operand of fewer columns transposed)."""
    bf = jnp.bfloat16
    x = jax.random.normal(jax.random.key(0), (48, I)).astype(bf)  # [R, I]
    w = jax.random.normal(jax.random.key(1), (O, I) if out_major else (I, O)).astype(bf)
    g = jax.random.normal(jax.random.key(2), (48, O)).astype(bf)  # cotangent [R, O]

    def plain(x, w):
        eqn = "ri,oi->ro" if out_major else "ri,io->ro"
        return jnp.einsum(eqn, x.astype(jnp.float32), w.astype(jnp.float32))

    y, pull = jax.vjp(lambda x, w: library_matmul(x, w, out_major), x, w)
    y_ref, pull_ref = jax.vjp(plain, x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-4)
    for got, want in zip(pull(g.astype(jnp.float32)), pull_ref(g.astype(jnp.float32)), strict=True):
        assert got.dtype == bf
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want), rtol=2**-7, atol=1e-2
        )
    g32 = g.astype(jnp.float32)
    grad = jax.grad(
        lambda x, w: jnp.sum(jnp.asarray(library_matmul(x, w, out_major)) * g32), (0, 1)
    )
    assert _dot_operand_types(grad, x, w) == {"bf16"}


@on_cpu
@pytest.mark.skipif(not library_products(jnp.bfloat16), reason="needs a CPU with bf16 arithmetic")
@pytest.mark.parametrize(("D", "F"), [(128, 256), (256, 128)])
def test_xla_keeps_every_library_product_in_bf16_on_this_cpu(D, F):
    """The compiled gradient of a bf16 projection: XLA converts no operand of a product to float32
    (it does for the transposed left operand that plain autodiff gives the weight's gradient), and
    the program runs (XLA fails at run time on a bf16 product whose result it transposes) and
    gives the weight's gradient, rounded to bf16."""
    x = jax.random.normal(jax.random.key(0), (4, 64, D)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (D, F)).astype(jnp.bfloat16).astype(jnp.float32)

    def loss(x, w):
        return project("BTD,DF->BTF", x, w, jnp.bfloat16).astype(jnp.float32).sum()

    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile()
    hlo = compiled.as_text()
    assert hlo is not None
    assert _compiled_dot_operand_types(hlo) == ["bf16"] * 4  # dx and dw (a sum needs no y)
    _, dw = compiled(x, w)  # rounded to bf16 (the weight's compute dtype)
    want = jnp.einsum("btd,btf->df", x.astype(jnp.float32), jnp.ones((4, 64, F)))
    np.testing.assert_allclose(np.asarray(dw), np.asarray(want), rtol=2**-8, atol=1e-3)


def _compiled_dot_operand_types(hlo: str) -> list[str]:
    """The element types of the operands of every dot in a compiled HLO module's text."""
    types = []
    for body in hlo.split("\n}\n"):
        for line in body.splitlines():
            if " dot(" not in line:
                continue
            for name in re.findall(r"dot\(%([^,)\s]+), %([^,)\s]+)\)", line)[0]:
                found = re.search(rf"%{re.escape(name)} = (\w+)\[", body)
                types.append(found.group(1) if found else "?")
    return types


@on_cpu
@pytest.mark.parametrize(
    "eqn",
    ["BTD,DNH->BTNH", "BTNH,NHD->BTD", "BTD,VD->BTV", "BTE,ED->BTD"],
)
def test_a_library_projection_is_the_einsum(monkeypatch, eqn):
    """Each projection's equation, through one [R, I] x [I, O] (or [O, I]) library product."""
    _features(monkeypatch, "avx2 avx512_bf16")
    sizes = {"B": 2, "T": 3, "D": 16, "N": 2, "H": 4, "V": 10, "E": 8}
    lhs, spec = eqn.split("->")[0].split(",")
    x = jax.random.normal(jax.random.key(0), [sizes[a] for a in lhs]).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), [sizes[a] for a in spec]).astype(jnp.bfloat16)
    y = project(eqn, x, w, jnp.bfloat16)
    want = jnp.einsum(eqn, x.astype(jnp.float32), w.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16 and y.shape == want.shape
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=2**-7, atol=1e-2)
    assert "custom_vjp" in str(
        jax.make_jaxpr(functools.partial(project, eqn, dtype=jnp.bfloat16))(x, w)
    )


def test_rounded_einsum_and_its_gradients_are_the_einsums():
    """An attention-shaped batched product: value and gradients against autodiff of the float32
    einsum of the same bf16 numbers (the cotangent, a bf16 value here, rounds exactly), and the
    backward pass's products take bf16 operands."""
    eqn = "BKGTH,BKSH->BKGTS"
    bf = jnp.bfloat16
    a = jax.random.normal(jax.random.key(0), (2, 2, 3, 5, 8)).astype(bf)
    b = jax.random.normal(jax.random.key(1), (2, 2, 7, 8)).astype(bf)
    g = jax.random.normal(jax.random.key(2), (2, 2, 3, 5, 7)).astype(bf).astype(jnp.float32)
    y, pull = jax.vjp(functools.partial(rounded_einsum, eqn), a, b)
    plain = functools.partial(jnp.einsum, eqn, preferred_element_type=jnp.float32)
    y_ref, pull_ref = jax.vjp(
        lambda a, b: plain(a.astype(jnp.float32), b.astype(jnp.float32)), a, b
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    for got, want in zip(pull(g), pull_ref(g), strict=True):
        assert got.dtype == bf
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want), rtol=2**-7, atol=1e-2
        )
    grad = jax.grad(lambda a, b: jnp.sum(jnp.asarray(rounded_einsum(eqn, a, b)) * g), (0, 1))
    assert _dot_operand_types(grad, a, b) == {"bf16"}


@on_cpu
@pytest.mark.parametrize("n_in", [1, 2])
def test_a_single_bf16_row_over_merged_input_axes(n_in):
    """The output projection's one row [1, 1, N, H] against its output-major kernel [D, N·H]: the
    product; its row is gathered into one axis for XLA's product loop (a row of one axis, as the
    other projections', is used as it is)."""
    shape = (4, 16) if n_in == 2 else (64,)
    x = jax.random.normal(jax.random.key(0), (1, 1, *shape)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (32, 64)).astype(jnp.bfloat16)
    fn = functools.partial(project_out_in, n_in=n_in, dtype=jnp.bfloat16)
    y = fn(x, w)
    want = jnp.einsum("bti,di->btd", x.reshape(1, 1, 64).astype(jnp.float32), w.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 1, 32)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)
    assert ("gather" in jax.jit(fn).lower(x, w).as_text()) is (n_in == 2)


@on_cpu
@pytest.mark.parametrize("features", ["avx2 avx512_bf16", "avx2 fma"], ids=["library", "no bf16"])
@pytest.mark.parametrize(("rows", "I", "O"), [(8, 64, 16), (8, 16, 64), (40, 16, 64), (1, 64, 16)])
def test_few_bf16_rows_run_weight_major_against_a_longer_input(monkeypatch, features, rows, I, O):
    """A bf16 product of 2-31 rows against an output-major [O, I] kernel runs weight-major ([O, I]
    x [R, I] -> [O, R], then transposed) where I > O on a CPU with bf16 arithmetic; from 32 rows
    on every such product does; either way it is the product."""
    _features(monkeypatch, features)
    x = jax.random.normal(jax.random.key(0), (rows, 1, I)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (O, I)).astype(jnp.bfloat16)
    fn = functools.partial(project_out_in, n_in=1, dtype=jnp.bfloat16)
    y = fn(x, w)
    want = jnp.einsum("bti,oi->bto", x.astype(jnp.float32), w.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16 and y.shape == (rows, 1, O)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-2, atol=5e-2)
    library = features == "avx2 avx512_bf16"
    expected = rows >= 32 or (rows > 1 and I > O and library)
    assert products.weight_major(jnp.bfloat16, rows, O, I) is expected
    lowered = jax.jit(fn).lower(x, w).as_text()
    assert ("optimization_barrier" in lowered) is expected
