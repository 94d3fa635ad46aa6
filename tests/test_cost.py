"""XLA cost analysis, loop-corrected: checked against unrolled programs and hand-counted matmuls."""

import gzip
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxllm import analytic, phases
from jaxllm.config import get_preset
from jaxllm.cost import (
    analyze,
    call_graph,
    correct_loops,
    normalize_costs,
)
from jaxllm.xla_hlo import (
    computation_costs,
    costable,
    fused_attention_flops,
    gemms_as_dots,
    library_workspace_bytes,
)

FIXTURES = Path(__file__).parent / "fixtures"

M = 64
MATMUL = 2 * M**3  # flops of one [M, M] @ [M, M]
X = jax.ShapeDtypeStruct((M, M), jnp.float32)
CPU = jax.default_backend() == "cpu"


def _scan_matmuls(k: int, unroll: bool):
    def f(x, ws):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, ws, unroll=unroll)[0]

    return jax.jit(f), (X, jax.ShapeDtypeStruct((k, M, M), jnp.float32))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_scan_of_k_matmuls_reports_k_matmuls(k):
    fn, args = _scan_matmuls(k, unroll=False)
    cost = analyze(fn, *args)
    assert cost.loop_corrected and cost.loops == ((k,) if k > 1 else ())
    assert cost.flops == pytest.approx(k * MATMUL, rel=1e-3)
    if k > 1 and CPU:  # what XLA alone reports (a GPU's own count leaves out cuBLAS calls)
        assert cost.raw_flops == pytest.approx(MATMUL, rel=1e-3)


def test_scanned_equals_unrolled_flops_transcendentals_and_bytes():
    def f(x, ws, unroll):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws, unroll=unroll)[0]

    ws = jax.ShapeDtypeStruct((6, M, M), jnp.float32)
    scanned = analyze(jax.jit(lambda x, w: f(x, w, False)), X, ws)
    unrolled = analyze(jax.jit(lambda x, w: f(x, w, True)), X, ws)
    assert scanned.flops == pytest.approx(unrolled.flops, rel=1e-3)
    assert scanned.transcendentals == unrolled.transcendentals
    # Loop bookkeeping (counter, copies of the carry) adds a little traffic the unrolled form lacks:
    # under 10% on a CPU, 19% on an H200 (819495 against 688152 bytes). Counted once, the loop
    # would read a sixth of the unrolled bytes.
    assert scanned.bytes_accessed == pytest.approx(
        unrolled.bytes_accessed, rel=0.1 if CPU else 0.25
    )


def test_nested_loops_multiply():
    def f(x):
        def inner(c, _):
            return c @ c, None

        def outer(c, _):
            return jax.lax.scan(inner, c, None, length=4)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0]

    cost = analyze(jax.jit(f), X)
    assert cost.loop_corrected and sorted(n or 0 for n in cost.loops) == [3, 4]
    assert cost.flops == pytest.approx(12 * MATMUL, rel=1e-3)


def test_fori_loop_with_static_bounds_is_corrected():
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, c: c @ c, x))
    cost = analyze(f, X)
    assert cost.loop_corrected and cost.flops == pytest.approx(5 * MATMUL, rel=1e-3)


def test_loop_of_unknown_trip_count_is_flagged():
    def f(x):
        return jax.lax.while_loop(lambda c: c[0, 0] < 100.0, lambda c: c @ c, x)

    cost = analyze(jax.jit(f), X)
    assert cost.loops == (None,)
    assert not cost.loop_corrected
    assert cost.flops == pytest.approx(MATMUL, rel=1e-3)  # its body counted once, and said so
    assert "trip count" in cost.loop_note


def test_loops_inside_called_computations_are_corrected():
    """A scan inside a conditional's branch (as loops sit inside command buffers or calls on a
    GPU) is reached through the call graph, not only through the entry's own while ops."""

    def f(x):
        scan5 = lambda y: jax.lax.scan(lambda c, _: (c @ c, None), y, None, length=5)[0]  # noqa: E731
        scan2 = lambda y: jax.lax.scan(lambda c, _: (c @ c, None), y, None, length=2)[0]  # noqa: E731
        return jax.lax.cond(x[0, 0] > 0, scan5, scan2, x)

    cost = analyze(jax.jit(f), X)
    assert cost.loop_corrected and sorted(n or 0 for n in cost.loops) == [2, 5]
    assert cost.flops == pytest.approx(5 * MATMUL, rel=1e-2)  # the costliest branch, as XLA does
    if CPU:  # what XLA alone reports (a GPU's own count leaves out cuBLAS calls)
        assert cost.raw_flops == pytest.approx(MATMUL, rel=1e-2)


def test_call_graph_reads_sites_of_an_hlo_text():
    text = "\n".join(
        [
            "HloModule m",
            "%body (p: f32[]) -> f32[] {",
            "  ROOT %p = f32[] parameter(0)",
            "}",
            "ENTRY %main (a: f32[]) -> f32[] {",
            '  %w = (s32[], f32[]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}',
            "  %c = f32[] conditional(%q, %a, %a), branch_computations={%b0, %b1}",
            "  %f = f32[] fusion(%a), kind=kLoop, calls=%fused",
            "  ROOT %k = f32[] call(%a), to_apply=%command_buffer",
            "}",
        ]
    )
    entry, sites = call_graph(text)
    assert entry == "main" and sites["body"] == []
    assert [(s.opcode, s.callees, s.trip_count) for s in sites["main"]] == [
        ("while", ("cond", "body"), 7),
        ("conditional", ("b0", "b1"), None),
        ("call", ("command_buffer",), None),
    ]  # the fusion is left out: no loop sits inside a fusion


def test_memory_fields_and_donation():
    def step(cache, x):  # cache [64, M, M], updated in place when donated
        return jax.lax.dynamic_update_slice(cache, x[None], (1, 0, 0))

    cache = jax.ShapeDtypeStruct((64, M, M), jnp.float32)
    donated = analyze(jax.jit(step, donate_argnums=0), cache, X)
    kept = analyze(jax.jit(step), cache, X)
    size = 64 * M * M * 4
    assert donated.alias_bytes == size and kept.alias_bytes == 0
    assert donated.argument_bytes == size + M * M * 4 and donated.output_bytes == size
    assert donated.footprint_bytes == (
        donated.argument_bytes + donated.output_bytes - donated.alias_bytes + donated.temp_bytes
    )
    assert kept.footprint_bytes >= 2 * size > donated.footprint_bytes
    assert donated.compile_seconds > 0


def test_normalize_costs_fills_missing_keys_and_rejects_negative():
    assert normalize_costs({"flops": 2.0, "bytes accessed": 8.0}) == {
        "flops": 2.0,
        "transcendentals": 0.0,
        "bytes accessed": 8.0,
    }
    with pytest.raises(ValueError, match="flops"):
        normalize_costs({"flops": -1.0, "bytes accessed": 8.0})


def test_a_gpu_train_step_is_corrected_by_the_same_code_on_the_cpu():
    """The optimized HLO of `tiny`'s scanned train step as an H200 compiled it (Triton GEMM
    fusions, command-buffer-era jaxlib 0.11.2): XLA's generic cost model on this CPU gives exactly
    the whole-program FLOPs the H200 reported, and the loop correction brings them to what the
    CPU's own compile of the same step reports, loop-corrected."""
    with gzip.open(FIXTURES / "h200_tiny_train_step.hlo.gz", "rt") as f:
        text = f.read()
    entry, _ = call_graph(text)
    raw = normalize_costs(computation_costs(costable(text), entry))
    assert raw["flops"] == 5_254_123  # cost_analysis() on the H200: 5254123 flops
    corrected, note, loops = correct_loops(text, raw)
    assert note == "" and loops == (2, 2)
    program = phases.build(get_preset("tiny"), "train", 2, 16)
    cpu = analyze(program.jitted, *program.abstract_args)
    assert corrected["flops"] == pytest.approx(cpu.flops, rel=0.03), cpu.loop_note


def _fixture(name: str) -> str:
    with gzip.open(FIXTURES / name, "rt") as f:
        return f.read()


XLA_OWN: dict[str, float] = dict.fromkeys(("flops", "transcendentals", "bytes accessed"), 0.0)
MEDIUM = get_preset("gpt2-medium").replace(dtype="bfloat16")


@pytest.mark.parametrize(
    ("fixture", "gpu_own", "count"),
    [
        # A bf16 prefill (B=1, T=1024) as an H200 compiled it: 48 cuBLASLt GEMMs and 24 cuDNN
        # fused attentions, no loop. The H200's own cost_analysis() counted 2.60e11 FLOPs of it.
        (
            "h200_gpt2_medium_bf16_prefill.hlo.gz",
            2.601e11,
            lambda: analytic.prefill_flops(MEDIUM, 1, 1024, head_positions=1),
        ),
        # A bf16 train step (B=8, T=1024), layers scanned: cuDNN's forward and backward attention
        # inside the loops. The H200's own cost_analysis(): 1.91e12, each loop body once.
        (
            "h200_gpt2_medium_bf16_train_step.hlo.gz",
            1.908e12,
            lambda: analytic.train_flops(MEDIUM, 8, 1024),
        ),
    ],
)
def test_a_gpus_gemms_and_fused_attention_are_counted(fixture, gpu_own, count, monkeypatch):
    text = _fixture(fixture)
    corrected, note, _ = correct_loops(text, XLA_OWN)
    monkeypatch.setattr(analytic, "fused", lambda config: True)  # cuDNN ran the attention
    assert note == "" and corrected["flops"] > 2.5 * gpu_own
    assert corrected["flops"] == pytest.approx(count(), rel=0.01)
    # The largest library scratch: cuBLASLt's 32 MiB, or cuDNN's backward attention's 32.5 MiB.
    assert library_workspace_bytes(text) == (34_078_976 if "train" in fixture else 33_554_432)


def test_a_gpu_loop_of_gemms_in_slicing_fusions_is_costed():
    # tests/test_train.py's scanned step (3 layers, remat), compiled on an H200 with the options
    # the unrolled GPU train step gets (cuBLAS GEMMs: scripts/gpu_cost_check.py, round 20). Its
    # loops hold GEMMs inside dynamic-slice fusions, their 32 MiB workspaces passed on as outputs,
    # and GEMMs with bias, GELU and accumulating (beta = 1) epilogues.
    text = _fixture("h200_rolled_train_step_cublas.hlo.gz")
    corrected, note, loops = correct_loops(text, XLA_OWN)
    assert note == "" and loops == (3, 3)
    # The same step under XLA's own options (Triton fusions, no custom calls), costed on the H200
    # by the same code: 12,888,021 FLOPs (docs/results/nvidia-h200/round20/cost_check.jsonl).
    assert corrected["flops"] == pytest.approx(12_888_021, rel=0.01)
    assert corrected["bytes accessed"] < 33_554_432  # no workspace counted as traffic


def _gemm_module(epilogue: str, beta: int) -> str:
    """One cuBLASLt GEMM [64, 32] x [32, 16] in HLO text, with C and a bias as operands."""
    config = (
        f'{{"gemm_backend_config":{{"alpha_real":1,"beta":{beta},"epilogue":"{epilogue}",'
        '"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
        '"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}'
    )
    c = ", %c" if beta else ""
    return "\n".join(
        [
            "HloModule m",
            "",
            "ENTRY %main (x: f32[64,32], w: f32[32,16], c: f32[64,16], b: f32[16]) -> f32[64,16] {",
            "  %x = f32[64,32]{1,0} parameter(0)",
            "  %w = f32[32,16]{1,0} parameter(1)",
            "  %c = f32[64,16]{1,0} parameter(2)",
            "  %b = f32[16]{0} parameter(3)",
            f"  %cc = (f32[64,16]{{1,0}}, s8[1024]{{0}}) custom-call(%x, %w{c}, %b), "
            f'custom_call_target="__cublas$lt$matmul", backend_config={config}',
            "  ROOT %y = f32[64,16]{1,0} get-tuple-element(%cc), index=0",
            "}",
        ]
    )


@pytest.mark.parametrize(("epilogue", "beta"), [("BIAS", 0), ("BIAS_GELU", 1), ("BIAS_RELU", 1)])
def test_cublas_epilogues_are_costed_as_the_ops_they_replace(epilogue, beta):
    # Truth: XLA's count of the same arithmetic written in jax (on this backend).
    def f(x, w, c, b):
        y = x @ w + (c if beta else 0.0) + b[None, :]
        return {"BIAS": y, "BIAS_GELU": jax.nn.gelu(y), "BIAS_RELU": jax.nn.relu(y)}[epilogue]

    # Compiled for the CPU, whose cost_analysis() is XLA's generic model (a GPU's counts no GEMM).
    cpu = jax.devices("cpu")[0]
    args = [jax.device_put(jnp.zeros(s), cpu) for s in ((64, 32), (32, 16), (64, 16), (16,))]
    truth = normalize_costs(jax.jit(f).lower(*args).compile().cost_analysis())
    costs = normalize_costs(computation_costs(costable(_gemm_module(epilogue, beta)), "main"))
    assert costs["flops"] == truth["flops"]
    assert costs["transcendentals"] == truth["transcendentals"]
    # One fused pass: x, w, C when accumulated, the bias and the result (no workspace), in bytes;
    # and as XLA counts the call's tuple: its two 8-byte pointers and the emptied workspace's zero.
    one_pass = 4 * (64 * 32 + 32 * 16 + beta * 64 * 16 + 16 + 64 * 16)
    assert costs["bytes accessed"] == one_pass + 2 * 8 + 1


def test_fused_attention_flops_from_the_calls_shapes():
    lines = [
        line
        for line in _fixture("h200_gpt2_medium_bf16_train_step.hlo.gz").splitlines()
        if "__cudnn$fmha" in line and "custom-call(" in line
    ]
    forward, backward = sorted(lines, key=lambda line: "Backward" in line)
    pairs = 1024 * 1025 // 2  # causal: [B=8, N=16, T=1024, S=1024], H=64
    assert fused_attention_flops(forward) == 2 * 2 * 8 * 16 * 64 * pairs
    assert fused_attention_flops(backward) == 5 * 2 * 8 * 16 * 64 * pairs
    assert fused_attention_flops("  %x = f32[2]{0} add(%a, %b)") == 0


def test_cublas_gemms_are_costed_as_the_dots_they_compute():
    config = (
        '{"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
        '"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}'
    )
    text = "\n".join(
        [
            "HloModule m",
            "",
            "ENTRY %main (x: f32[64,32], w: f32[32,16]) -> f32[64,16] {",
            "  %x = f32[64,32]{1,0} parameter(0)",
            "  %w = f32[32,16]{1,0} parameter(1)",
            "  %cc = (f32[64,16]{1,0}, s8[1024]{0}) custom-call(%x, %w), "
            f'custom_call_target="__cublas$gemm", backend_config={config}',
            "  ROOT %y = f32[64,16]{1,0} get-tuple-element(%cc), index=0",
            "}",
        ]
    )
    assert "fusion(%x, %w), kind=kOutput" in gemms_as_dots(text)
    assert computation_costs(costable(text), "main")["flops"] == 2 * 64 * 32 * 16
