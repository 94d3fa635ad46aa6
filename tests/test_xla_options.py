"""The XLA compile options of the train step and the serving programs: which device and program
get them, and that the programs are compiled with them."""

import jax
import pytest

from jaxllm import measure, serve, tables, train, xla_options
from jaxllm.cache import KVCache
from jaxllm.config import get_preset
from jaxllm.model import init_params

CFG = get_preset("tiny")  # layers scanned, one at a time
UNROLLED = CFG.replace(scan_unroll=CFG.n_layers)


def test_a_gpu_unrolled_step_goes_to_cublas_without_cuda_graphs():
    assert xla_options.train_options(UNROLLED, backend="gpu") == {
        "xla_gpu_enable_triton_gemm": False,
        "xla_gpu_enable_command_buffer": "",
    }
    assert xla_options.train_options(CFG.replace(scan_layers=False), backend="gpu")


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_other_devices_keep_xla_options(backend):
    assert xla_options.train_options(UNROLLED, backend=backend) == {}


def test_a_rolled_gpu_step_keeps_xla_options():
    assert xla_options.rolls_layers(CFG) and not xla_options.rolls_layers(UNROLLED)
    assert xla_options.train_options(CFG, backend="gpu") == {}


@pytest.mark.parametrize(
    ("backend", "features", "options"),
    [
        ("cpu", "avx2 avx512f avx512_bf16", {"xla_cpu_prefer_vector_width": 512}),
        ("cpu", "avx2 fma", {}),
        ("cpu", "", {}),
        ("gpu", "avx2 avx512f", {}),
    ],
)
def test_serving_vectorizes_512_bits_wide_on_a_cpu_with_avx512(
    monkeypatch, backend, features, options
):
    monkeypatch.setattr(xla_options, "cpu_features", lambda: frozenset(features.split()))
    assert xla_options.serve_options(backend=backend) == options


def test_the_decode_step_is_compiled_with_the_serving_options(monkeypatch):
    """An option XLA does not know reaches the compiler, named in its error."""
    monkeypatch.setattr(serve, "serve_options", lambda: {"xla_not_an_option": 1})
    config = serve.serving_config(CFG)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    cache = jax.eval_shape(lambda: KVCache.init(config, 1, 8))
    step = serve.make_decode_step.__wrapped__(config)
    with pytest.raises(Exception, match="xla_not_an_option"):
        step.lower(params, cache, jax.ShapeDtypeStruct((1,), "int32")).compile()


def test_the_train_step_is_compiled_with_its_options(monkeypatch):
    """An option XLA does not know reaches the compiler, named in its error."""
    monkeypatch.setattr(xla_options, "train_options", lambda config: {"xla_not_an_option": 1})
    optimizer = train.make_optimizer()
    step = train.make_train_step(CFG, optimizer)
    state = jax.eval_shape(lambda: train.init_state(CFG, optimizer, jax.random.key(0)))
    batch = jax.ShapeDtypeStruct((2, 9), "int32")
    with pytest.raises(Exception, match="xla_not_an_option"):
        step.lower(state, batch).compile()


def test_analyze_reports_the_options_the_step_was_compiled_with(monkeypatch):
    """`jaxllm analyze`'s record names the options the analysed program was built with: the
    serving programs' for decode; where the train step gets some, that step's (the options of a GPU's are accepted,
    and ignored, by the CPU's compiler)."""
    decode = measure.analyze_phase(CFG, "decode", 1, 8, quick=True)
    assert decode.to_json()["xla"]["compile_options"] == xla_options.serve_options()
    gpu = {"xla_gpu_enable_triton_gemm": False}
    monkeypatch.setattr(xla_options, "train_options", lambda config: gpu)
    result = measure.analyze_phase(CFG, "train", 1, 8, quick=True)
    assert result.to_json()["xla"]["compile_options"] == gpu
    assert "xla_gpu_enable_triton_gemm=False" in "\n".join(tables.analysis_table(result))
