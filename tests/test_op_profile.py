"""``jaxllm profile`` (``jaxllm.opprofile``): wall time shared among the ops running at each instant,
against shares worked out by hand, and a real phase's ops against its compiled module."""

import gzip
import importlib.util
import json
import re
from pathlib import Path

import jax
import pytest
from conftest import FLOP_TOLERANCE

from jaxllm import analytic, hardware, opprofile, phases
from jaxllm.cli import main
from jaxllm.config import PRESETS, get_preset
from jaxllm.errors import InputError
from jaxllm.xla_hlo import workspaces_as_empty

FIXTURES = Path(__file__).parent / "fixtures"


def test_overlapping_ops_share_the_instants_they_overlap():
    # a alone for 5 µs, a and b together for 5 (2.5 each), b alone for 5; c later, alone.
    spans = [(0.0, 10.0, "a"), (5.0, 15.0, "b"), (20.0, 21.0, "c")]
    assert opprofile.shared_wall(spans) == pytest.approx({"a": 7.5, "b": 7.5, "c": 1.0})


def test_shares_add_up_to_the_busy_wall_time():
    # One name open twice at once (two threads running instances of it), beside another op.
    spans = [(0.0, 4.0, "x"), (1.0, 3.0, "x"), (2.0, 6.0, "y")]
    share = opprofile.shared_wall(spans)
    # [0,1) x; [1,2) x,x; [2,3) x,x,y: x 2/3, y 1/3; [3,4) x,y; [4,6) y.
    assert share == pytest.approx({"x": 1 + 1 + 2 / 3 + 0.5, "y": 1 / 3 + 0.5 + 2})
    assert sum(share.values()) == pytest.approx(6.0)


def _process(pid, name):
    return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}


def _event(pid, name, ts, dur, op=None, module="jit_step"):
    args = {"hlo_op": op, "hlo_module": module} if op else {}
    return {"ph": "X", "pid": pid, "name": name, "ts": ts, "dur": dur, "args": args}


EVENTS = [
    _process(1, "/host:CPU"),
    _process(2, "/device:GPU:0"),
    _event(1, "ynn_fusion.3", 0, 5, op="ynn_fusion.3"),
    _event(1, "copy", 1, 2, op="copy", module="jit_convert_element_type"),  # another program's
    _event(1, "ThunkExecutor::Execute", 0, 9),
    _event(1, "$cli.py:12 main", 0, 9),
    _event(1, "Thunk", 3, 2, op="custom-call.2"),  # the host's side of a GPU's thunk
    _event(2, "loop_add_fusion", 3, 2),  # a kernel whose event names no instruction
    _event(2, "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 5, 4, op="custom-call.2"),
    _event(2, "void cudnn::fusion::compute_dot_do_o", 9, 1, op="custom-call.5"),
    _event(2, "Memset", 10, 1, op="copy", module="jit_convert_element_type"),
    _event(2, "input_reduce_fusion_16", 11, 1),  # XLA's kernel name for input_reduce_fusion.16
    _event(2, "nvjet_sm90_gemv", 12, 1),
    {"ph": "i", "pid": 1, "name": "dot.1", "ts": 1},
]


def test_host_ops_are_the_modules_instructions_named_by_their_events():
    ops = {"ynn_fusion.3", "dot.1", "tuple.2", "copy"}
    assert opprofile.op_spans(EVENTS, "jit_step", ops, host=True) == [(0.0, 5.0, "ynn_fusion.3")]


def test_device_ops_are_the_kernels_under_the_instructions_that_launched_them():
    ops = {"loop_add_fusion", "input_reduce_fusion.16", "custom-call.2", "custom-call.5"}
    assert opprofile.op_spans(EVENTS, "jit_step", ops, host=False) == [
        (3.0, 5.0, "loop_add_fusion"),
        (5.0, 9.0, "custom-call.2"),  # a cuBLAS kernel, under its GEMM's instruction
        (9.0, 10.0, "custom-call.5"),
        (11.0, 12.0, "input_reduce_fusion.16"),  # no hlo_op: the instruction its name gives
        (12.0, 13.0, "nvjet_sm90_gemv"),  # neither: under the kernel's own name
    ]


def test_a_module_is_named_by_its_texts_header():
    assert opprofile.module_name("HloModule jit_train_step, is_scheduled=true\n") == (
        "jit_train_step"
    )
    with pytest.raises(ValueError, match="not an HLO module"):
        opprofile.module_name("ENTRY %main () -> f32[] {")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # Names as jaxllm's compiled train, prefill and decode steps carry them.
        ("jit(train_step)/optimizer/jit(_where)/select_n", ("optimizer", False)),
        ("jit(train_step)/transpose(jvp(head_loss))/RO,RI->OI/dot_general", ("head/loss", True)),
        ("jit(decode_step)/Transformer/head/dot_general", ("head/loss", False)),
        ("jit(decode_step)/kv_cache/dynamic_update_slice", ("KV cache writes", False)),
        (
            "jit(train_step)/transpose(jvp(Transformer))/embed/jit(_take)/scatter-add",
            ("embeddings", True),
        ),
        ("jit(prefill)/Transformer/pos_embed/add", ("embeddings", False)),
        (
            "jit(train_step)/jvp(Transformer)/Transformer._layers/closed_call/blocks/"
            "_StandardPromotion_1/mlp_norm/reduce_sum",
            ("norms", False),
        ),
        (
            "jit(train_step)/transpose(jvp(Transformer))/Transformer._layers/closed_call/blocks/"
            "attn/q/q._in_out/BTD,DNH->BTNH/dot_general",
            ("attention projections", True),
        ),
        (
            "jit(decode_step)/Transformer/Transformer._layers/block_0/attn/o/dot_general",
            ("attention projections", False),
        ),
        (
            "jit(prefill)/Transformer/Transformer._layers/block_3/attn/BKGTH,BKSH->BKGTS/dot_general",
            ("attention", False),
        ),
        ("cache.k[1]", ("attention", False)),  # a product XLA left unnamed reads the cache
        ("params['block_1']['mlp']['up']['kernel']", ("MLP", False)),
        (
            "jit(train_step)/transpose(jvp(Transformer))/Transformer._layers/concatenate",
            ("layers' slices and stacks", True),
        ),
        ("jit(train_step)/add", ("other", False)),
        ("", ("other", False)),
    ],
)
def test_an_op_is_named_by_the_part_of_the_model_it_computes(source, expected):
    assert opprofile.part(source) == expected


def test_an_unnamed_op_takes_the_name_of_the_parameter_it_reads():
    # As XLA:CPU left tiny's decode step: its products over the cache and its one-row products
    # unnamed, the cache read through a bitcast that keeps the parameter's name.
    text = (
        '  %cache_k_0_.1 = f32[2,4,16,8]{3,2,1,0} parameter(36), metadata={op_name="cache.k[0]"}\n'
        '  %bitcast.14 = f32[8,16,8]{2,1,0} bitcast(%cache_k_0_.1), metadata={op_name="cache.k[0]"}\n'
        "  %q.1 = f32[8,8,1]{2,1,0} parameter(1)\n"
        "  %dot.12 = f32[8,16,1]{2,1,0} dot(%bitcast.14, %q.1), lhs_batch_dims={0}, "
        "lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}\n"
        "  %w = f32[128,32]{1,0} parameter(29), metadata={op_name=\"params[\\'block_1\\']"
        "[\\'mlp\\'][\\'up\\'][\\'kernel\\']\"}\n"
        "  %x = f32[1,128]{1,0} parameter(2)\n"
        "  %dot.3 = f32[1,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n"
    )
    hlo = opprofile.hlo_ops(text)
    assert hlo["w"].source == "params['block_1']['mlp']['up']['kernel']"
    spans = [(0.0, 2.0, "dot.12"), (2.0, 3.0, "dot.3")]
    ops = {op.name: (op.part, op.backward) for op in opprofile.op_times(hlo, spans, calls=1)}
    assert ops == {"dot.12": ("attention", False), "dot.3": ("MLP", False)}


def test_hlo_ops_name_shape_opcode_operands_and_source():
    text = (
        "  %dot.7 = f32[8,12,128,1]{3,2,1,0} dot(%cache_k_4_.1, %bitcast.2), lhs_batch_dims={0,1}, "
        'metadata={op_name="jit(decode_step)/attn/dot_general" stack_frame_id=3}\n'
        "  %while.3 = (s32[], f32[2,16]{1,0}, /*index=2*/f32[2]{0}) while(%tuple.1), "
        "condition=%cond, body=%body\n"
    )
    ops = opprofile.hlo_ops(text)
    dot, loop = ops["dot.7"], ops["while.3"]
    assert dot.text == (
        "f32[8,12,128,1] dot(%cache_k_4_.1, %bitcast.2) <- ...jit(decode_step)/attn/dot_general"
    )
    assert (dot.opcode, dot.nbytes, dot.dims) == ("dot", 4 * 8 * 12 * 128, (8, 12, 128, 1))
    assert dot.operands == ("cache_k_4_.1", "bitcast.2")
    assert loop.text == "(s32[], f32[2,16], /*index=2*/f32[2]) while(%tuple.1)"
    assert (loop.opcode, loop.nbytes, loop.dims, loop.operands) == (
        "while",
        4 + 128 + 8,
        (),
        ("tuple.1",),
    )


def test_shape_bytes_count_arrays_and_tuples():
    assert opprofile.shape_bytes("bf16[8,3072]") == 2 * 8 * 3072
    assert opprofile.shape_bytes("(s32[], f32[2,16], /*index=2*/pred[3])") == 4 + 4 * 32 + 3
    assert opprofile.shape_bytes("token[]") == 0


def test_op_bytes_are_its_result_and_each_operand_once():
    text = (
        "  %w = bf16[3072,768]{1,0} parameter(0)\n"
        "  %x = bf16[8,768]{1,0} parameter(1)\n"
        "  %ynn_fusion.4 = f32[8,3072]{1,0} fusion(%x, %w, %x), kind=kCustom\n"
    )
    hlo = opprofile.hlo_ops(text)
    assert hlo["ynn_fusion.4"].operands == ("x", "w", "x")
    assert opprofile.op_bytes(hlo, "ynn_fusion.4") == 4 * 8 * 3072 + 2 * 3072 * 768 + 2 * 8 * 768


FUSED_DOT = """
%fused_computation.4 (param_0.1: bf16[8,768], param_1.1: bf16[3072,768]) -> f32[8,3072] {
  %param_0.1 = bf16[8,768]{1,0} parameter(0)
  %param_1.1 = bf16[3072,768]{1,0} parameter(1)
  ROOT %dot.2 = f32[8,3072]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

ENTRY %main (x: bf16[8,768], w: bf16[3072,768], k: f32[8,12,128,64], q: f32[8,12,64,1]) -> f32[8,3072] {
  %x = bf16[8,768]{1,0} parameter(0)
  %w = bf16[3072,768]{1,0} parameter(1)
  %k = f32[8,12,128,64]{3,2,1,0} parameter(2)
  %q = f32[8,12,64,1]{3,2,1,0} parameter(3)
  %dot.9 = f32[8,12,128,1]{3,2,1,0} dot(%k, %q), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}
  ROOT %ynn_fusion.4 = f32[8,3072]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.4
}
"""


def test_op_flops_of_a_dot_and_of_a_fusion_holding_one():
    flops = opprofile.op_flops(opprofile.hlo_ops(FUSED_DOT))
    assert flops["ynn_fusion.4"] == 2 * 8 * 3072 * 768
    assert flops["dot.9"] == 2 * (8 * 12 * 128 * 1) * 64  # batched: result elements x contraction
    assert "x" not in flops and "dot.2" in flops  # parameters run no product


def test_an_op_run_twice_a_call_counts_its_bytes_and_flops_twice():
    hlo = opprofile.hlo_ops(FUSED_DOT)
    spans = [(0.0, 1.0, "ynn_fusion.4"), (2.0, 3.0, "ynn_fusion.4"), (4.0, 5.0, "dot.9")]
    ops = {op.name: op for op in opprofile.op_times(hlo, spans, calls=1)}
    assert ops["ynn_fusion.4"].flops == 2 * 2 * 8 * 3072 * 768
    assert ops["ynn_fusion.4"].nbytes == 2 * opprofile.op_bytes(hlo, "ynn_fusion.4")
    assert ops["ynn_fusion.4"].seconds == pytest.approx(2e-6)
    assert ops["dot.9"].flops == 2 * 8 * 12 * 128 * 64


def test_a_gpu_kernel_is_matched_to_the_instruction_it_is_named_after():
    hlo = opprofile.hlo_ops(FUSED_DOT)
    spans = [(0.0, 2.0, "ynn_fusion_4"), (2.0, 3.0, "sm90_xmma_gemm_bf16")]
    ops = {op.name: op for op in opprofile.op_times(hlo, spans, calls=1)}
    fused = ops["ynn_fusion_4"]
    assert (fused.kind, fused.flops) == ("ynn_fusion", 2 * 8 * 3072 * 768)
    assert fused.hlo.startswith("f32[8,3072] fusion(%x, %w)")
    library = ops["sm90_xmma_gemm_bf16"]  # a library's kernel: no instruction of that name
    assert (library.kind, library.flops, library.nbytes, library.hlo) == (
        "sm90_xmma_gemm_bf16",
        0,
        0,
        "",
    )


GEMM = (
    "  %x = bf16[64,32]{1,0} parameter(0)\n"
    "  %w = bf16[16,32]{1,0} parameter(1)\n"
    "  %custom-call.3 = (bf16[64,16]{1,0}, s8[33554432]{0}) custom-call(%x, %w), "
    'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{'
    '"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":'
    '["1"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}\n'
)


def test_a_cublas_gemm_counts_its_products_and_not_its_scratch():
    hlo = opprofile.hlo_ops(workspaces_as_empty(GEMM))
    assert hlo["custom-call.3"].library_flops == 2 * 64 * 16 * 32
    [op] = opprofile.op_times(hlo, [(0.0, 1.0, "custom-call.3")], calls=1)
    assert (op.kind, op.flops) == ("custom-call", 2 * 64 * 16 * 32)
    assert op.nbytes == 2 * (64 * 16 + 64 * 32 + 16 * 32)  # the 32 MiB workspace left out


def test_an_h200_prefills_library_calls_carry_its_products():
    # gpt2-medium's bf16 prefill (B=1, T=1024) as an H200 compiled it: cuBLASLt GEMMs and cuDNN
    # fused attention, no loop. Its ops' FLOPs, each counted once, against the closed form.
    with gzip.open(FIXTURES / "h200_gpt2_medium_bf16_prefill.hlo.gz", "rt") as f:
        text = f.read()
    hlo = opprofile.hlo_ops(workspaces_as_empty(text))
    entry = re.findall(r"^ENTRY %([\w.\-]+)", text, re.MULTILINE)[0]
    flops = opprofile.op_flops(hlo)
    total = sum(flops.get(name, 0) for name, op in hlo.items() if op.computation == entry)
    calls = [op for op in hlo.values() if op.opcode == "custom-call" and op.library_flops]
    assert len(calls) == 48 + 24  # cuBLASLt's GEMMs (the rest are XLA's fusions), cuDNN's attention
    medium = get_preset("gpt2-medium").replace(dtype="bfloat16")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analytic, "fused", lambda config: True)  # cuDNN ran the attention
        expected = analytic.prefill_flops(medium, 1, 1024, head_positions=1)
    assert total == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("phase", phases.PHASES)
def test_a_profiled_phase_lists_the_ops_of_its_compiled_module(phase):
    program = phases.build(PRESETS["tiny"], phase, 2, 16)
    result = opprofile.profile(program, calls=3)  # chained: each call donates what the next takes
    if jax.default_backend() != "cpu":
        # Each kernel counts under the instruction whose thunk launched it (XLA's annotations in
        # the trace), cuBLAS's and cuDNN's too, so the products' FLOPs match the closed form here as
        # well; the instruction-level checks below are the CPU's (not yet run on a GPU).
        flops = phases.analytic_view(program).flops
        assert result.products()[1] == pytest.approx(flops, rel=FLOP_TOLERANCE)
        return
    text = program.jitted.lower(*program.abstract_args).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    # Every product of the step runs in every call: XLA's own loops (dot) and YNNPACK's fusions.
    products = set(re.findall(r"%([\w.\-]+) = \S+ dot\(", entry))
    products |= set(re.findall(r"%(ynn_fusion[\w.\-]*) = ", entry))
    profiled = {op.name for op in result.ops}
    assert products and products <= profiled, products - profiled
    # No runtime event among them, and no loop: its time is its body's ops'.
    loops = set(re.findall(r"%([\w.\-]+) = .*? while\(", text))
    assert profiled <= set(re.findall(r"%([\w.\-]+) = ", text)) - loops
    assert all(op.hlo and op.nbytes > 0 for op in result.ops)
    seconds = [op.seconds for op in result.ops]
    assert seconds == sorted(seconds, reverse=True)
    # Shares count each instant once: no more than the span from the first op to the last.
    assert 0 < result.op_s <= result.span_s * (1 + 1e-9)
    assert result.wall_s > 0
    assert sum(result.by_kind().values()) == pytest.approx(result.op_s)
    # Every product is named by the part of the model it computes; the backward pass is training's.
    parts = {(op.part, op.backward) for op in result.ops if op.flops}
    names = {"MLP", "attention", "attention projections", "head/loss"}
    assert {name for name, _ in parts} == names
    assert {backward for _, backward in parts} == ({False, True} if phase == "train" else {False})
    assert sum(f + b for f, b in result.by_part().values()) == pytest.approx(result.op_s)
    assert ("optimizer" in result.by_part()) == (phase == "train")
    assert "KV cache writes" in result.by_part() or phase != "decode"
    # The products' FLOPs read off the compiled module, each op counted as often as it ran, against
    # the closed form (the decode step's one score against its own new key is XLA's elementwise
    # product and sum, not a dot: 0.4% of tiny's step).
    flops = phases.analytic_view(program).flops
    assert result.products()[1] == pytest.approx(flops, rel=0 if phase != "decode" else 0.01)


def test_profile_cli_keeps_the_trace_where_asked(tmp_path, capsys):
    args = ["profile", "--preset", "tiny", "--phase", "prefill", "--batch", "1", "--seq", "8"]
    assert main([*args, "--calls", "1", "--trace-dir", str(tmp_path / "trace")]) == 0
    (trace,) = (tmp_path / "trace").rglob("perfetto_trace.json.gz")
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("ph") == "X" for e in events)
    assert capsys.readouterr().out.startswith("prefill B=1 seq=8, 1 calls:")


def test_profile_cli_prints_kinds_and_ops_and_json(capsys):
    args = ["profile", "--preset", "tiny", "--phase", "decode", "--batch", "2", "--seq", "16"]
    assert main([*args, "--calls", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decode B=2 seq=16, 2 calls:") and "a call without it" in out
    assert (
        "| part | ms a call | share |" in out
        and "| op kind | ms a call | share |" in out
        and "| op | ms a call | MB | GB/s | GFLOP/s | HLO |" in out
    )
    assert main([*args, "--calls", "2", "--top", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["ops"]) == 3 and row["calls"] == 2 and row["wall_s"] > 0
    assert all(op["nbytes"] > 0 for op in row["ops"])
    assert sum(row["by_kind"].values()) == pytest.approx(row["op_s"])
    assert sum(p["forward_s"] for p in row["by_part"].values()) == pytest.approx(row["op_s"])
    assert all(p["backward_s"] == 0 for p in row["by_part"].values())
    assert 0 < row["product_s"] <= row["op_s"] and row["product_flops"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--phase", "serve", "--batch", "2", "--seq", "16"], "unknown phase 'serve'"),
        (["--phase", "decode", "--batch", "2", "--seq", "9999"], "--seq 9999 is beyond"),
        (["--phase", "decode", "--batch", "2", "--seq", "16", "--calls", "0"], "got '0'"),
    ],
)
def test_profile_cli_refuses_bad_input_naming_it(extra, message, capsys):
    assert main(["profile", "--preset", "tiny", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("below", "reason"), [("", "it is a file"), ("sub", "trace.txt is a file")]
)
def test_profile_refuses_a_trace_dir_that_is_or_is_below_a_file(tmp_path, capsys, below, reason):
    (tmp_path / "trace.txt").write_text("")
    path = tmp_path / "trace.txt" / below if below else tmp_path / "trace.txt"
    args = ["--phase", "decode", "--batch", "1", "--seq", "8", "--trace-dir", str(path)]
    assert main(["profile", "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert f"--trace-dir: '{path}' cannot be a directory: " in err and reason in err
    with pytest.raises(InputError, match=r"trace_dir .* cannot be a directory"):  # the library's
        opprofile.profile_phase(PRESETS["tiny"], "decode", 1, 8, 1, trace_dir=path)


def _experiment():
    path = Path(__file__).resolve().parents[1] / "experiments" / "ops.py"
    spec = importlib.util.spec_from_file_location("experiment_ops", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _profile(phase, batch, product, other):
    """An OpProfile of one product op (seconds, FLOPs, bytes) and one other op (seconds)."""
    ops = [
        opprofile.OpTime(
            "ynn_fusion.1", "ynn_fusion", product[0], "", product[2], product[1], "MLP", False
        ),
        opprofile.OpTime("add_fusion", "add_fusion", other, "", 100, 0, "other", False),
    ]
    return opprofile.OpProfile(phase, batch, 16, 2, 1.0, 1.0, ops)


def test_the_ops_experiment_rates_products_against_the_peaks():
    ops = _experiment()
    peaks = hardware.Peaks(1e12, 1e11, "f32", "test")
    # Train: 3 ms of products doing 2.4 GFLOP over 60 MB, 1 ms of other ops.
    train = ops.row(("train", 4, 8), _profile("train", 4, (3e-3, 2.4e9, 60e6), 1e-3), peaks)
    assert train["product_share"] == pytest.approx(0.75)
    assert train["of_matmul_peak"] == pytest.approx(0.8)  # 800 GFLOP/s
    assert train["of_read_bandwidth"] == pytest.approx(0.2)  # 20 GB/s
    assert train["other_kinds"] == "add_fusion 1 ms"
    # Decode: 1 ms of products doing 20 MFLOP over 90 MB (90 GB/s), 0.25 ms of other ops.
    decode = ops.row(("decode", 1, 16), _profile("decode", 1, (1e-3, 2e7, 90e6), 2.5e-4), peaks)
    rows = [train, train, decode, decode]
    text = "\n".join(ops.summary(rows, peaks))
    assert "train B=4: the products run at 80.0% of the matmul peak" in text
    assert "nearer the matmul peak" in text and "nearer the read bandwidth" in text
    assert "Above the read bandwidth" not in text
