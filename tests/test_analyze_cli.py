"""``jaxllm analyze`` and ``jaxllm info``'s memory figures, end to end on the real phases."""

import json

import jax.numpy as jnp
import pytest
from conftest import FLOP_TOLERANCE

from jaxllm import analytic, measure, memory, train
from jaxllm.cache import cache_dtype
from jaxllm.cli import main
from jaxllm.config import PRESETS, get_preset


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "calibration"))


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_info_json_has_memory_and_kv_bytes_per_token(capsys):
    assert main(["info", "--preset", "gpt2", "--json", "--batch", "8"]) == 0
    out = _json(capsys)
    assert out["kv_bytes_per_token"] == 2 * 4 * 12 * 768  # K and V, float32, 12 layers, 768 wide
    serve = out["memory"]["serve"]
    assert serve["kv_cache"] == 8 * 1024 * out["kv_bytes_per_token"]
    assert out["memory"]["train"]["adam"] == 2 * 4 * out["params"]["total"]


def test_info_serving_memory_is_what_serving_holds(capsys):
    """Computing in bf16: weights stored in bf16 (2 bytes each), the cache in the dtype serving
    keeps on this device (float32 on a CPU), as analyze's prefill and decode figures."""
    argv = ["--preset", "small", "--override", "dtype=bfloat16", "--batch", "2", "--seq", "128"]
    assert main(["info", *argv, "--json"]) == 0
    out = _json(capsys)
    cfg, serve = out["config"], out["memory"]["serve"]
    kv_itemsize = jnp.dtype(cache_dtype(get_preset("small").replace(dtype="bfloat16"))).itemsize
    head_dim = cfg["d_model"] // cfg["n_heads"]
    assert serve["params"] == 2 * out["params"]["total"]
    assert (
        serve["kv_cache"]
        == 2 * kv_itemsize * 2 * 128 * cfg["n_layers"] * cfg["n_kv_heads"] * head_dim
    )
    assert main(["analyze", *argv, "--phase", "prefill", "--json", "--quick"]) == 0
    assert _json(capsys)["analytic"]["memory"] == serve


def test_analyze_gpt2_decode_json(capsys):
    argv = ["analyze", "--preset", "gpt2", "--phase", "decode", "--batch", "8", "--seq", "1024"]
    assert main([*argv, "--json", "--quick"]) == 0
    out = _json(capsys)
    xla, a = out["xla"], out["analytic"]
    for key in ("flops", "bytes_accessed", "alias_bytes", "temp_bytes", "footprint_bytes"):
        assert xla[key] > 0
    assert xla["loop_corrected"] and xla["alias_bytes"] >= a["memory"]["kv_cache"]  # cache donated
    assert xla["flops"] == pytest.approx(a["flops"], rel=0.03)
    # A decode step at B=8 does ~2 FLOPs per byte it must move (the weights and cache are read once
    # for 8 tokens): under any device's ridge point. The verdict itself is tested in test_roofline.
    assert out["roofline"]["intensity"] == pytest.approx(a["flops"] / a["bytes"])
    assert 1 < out["roofline"]["intensity"] < 4 and "measured" not in out


# The fields of `jaxllm analyze --json` as the README's table documents them.
DOCUMENTED = {
    "analytic": {"flops", "flops_causal", "flops_convention", "bytes", "decode_bytes", "memory"}
    | {"params", "tokens", "capacity", "slots_read"},
    "xla": {"flops", "transcendentals", "bytes_accessed", "raw_flops", "raw_bytes_accessed"}
    | {"loop_corrected", "loop_note", "loops", "argument_bytes", "output_bytes", "alias_bytes"}
    | {"temp_bytes", "footprint_bytes", "compile_seconds", "compile_options"},
    "measured": {"seconds_median", "seconds_p10", "seconds_p90", "seconds_min", "repeats"}
    | {"warmup", "tokens_per_s"},
    "roofline": {"flops", "bytes", "peak_flops_per_s", "bandwidth_bytes_per_s", "intensity"}
    | {"ridge", "bound", "predicted_seconds", "measured_seconds", "efficiency", "mfu", "mbu"}
    | {"xla", "peaks"},
    "peaks": {"flops_per_s", "bandwidth_bytes_per_s", "matmul", "source", "suspect"},
}


def test_the_record_prints_the_documented_json_and_flattens_it():
    result = measure.analyze_phase(PRESETS["tiny"], "decode", 2, 16, True, True, "tiny")
    out = json.loads(json.dumps(result.to_json()))
    assert set(out) == {"preset", "phase", "batch", "seq", "device", *DOCUMENTED} - {"peaks"}
    for section in ("analytic", "xla", "measured"):
        assert set(out[section]) == DOCUMENTED[section], section
    beside = {"calibrated"} if result.calibrated is not None else set()  # on an accelerator
    assert set(out["roofline"]) == DOCUMENTED["roofline"] | beside
    assert set(out["roofline"]["peaks"]) == DOCUMENTED["peaks"]
    assert set(out["roofline"]["xla"]) == DOCUMENTED["roofline"] - {"xla", "peaks"}
    flat = result.flat()
    assert flat["roofline_xla_predicted_seconds"] == result.roofline.xla.predicted_seconds
    assert flat["measured_tokens_per_s"] == 2 / result.seconds  # B tokens per decode step
    assert flat["analytic_decode_bytes_weights"] == out["analytic"]["decode_bytes"]["weights"]
    assert not any(isinstance(v, dict) for v in flat.values())


def test_flatten_joins_the_path_to_each_value():
    nested = {"a": 1, "b": {"c": 2, "d": {"e": [3]}}}
    assert measure.flatten(nested) == {"a": 1, "b_c": 2, "b_d_e": [3]}


WIDE = ["--preset", "tiny", "--override", "d_model=256", "--override", "d_ff=1024"]


@pytest.mark.parametrize(
    ("phase", "extra"),
    [
        ("train", []),  # the layers jaxllm train compiles (unrolled on a CPU)
        ("train", ["--override", "scan_unroll=1"]),  # scanned layers: proves the loop correction
        ("train", ["--override", "scan_layers=false"]),
        ("prefill", []),  # serving phases run with unrolled layers (jaxllm.serve.for_serving)
        ("decode", []),
        ("decode", ["--override", "n_kv_heads=2"]),
    ],
)
def test_real_phases_match_the_analytic_count(phase, extra, capsys):
    argv = ["analyze", *WIDE, *extra, "--phase", phase, "--batch", "4", "--seq", "64"]
    assert main([*argv, "--json", "--quick"]) == 0
    out = _json(capsys)
    assert out["xla"]["loop_corrected"]
    assert out["xla"]["flops"] == pytest.approx(out["analytic"]["flops"], rel=FLOP_TOLERANCE)


def test_analyze_train_is_the_program_jaxllm_train_compiles(capsys):
    argv = ["analyze", "--preset", "tiny", "--phase", "train", "--batch", "2", "--seq", "16"]
    loops = []
    for extra in ([], ["--override", "scan_unroll=1"]):
        assert main([*argv, *extra, "--json", "--quick"]) == 0
        loops.append(_json(capsys)["xla"]["loops"])
    unrolled = train.training_config(PRESETS["tiny"]).scan_unroll == PRESETS["tiny"].n_layers
    assert loops == ([[], [2, 2]] if unrolled else [[2, 2], [2, 2]])


def test_analyze_measure_tiny_train_and_table(capsys):
    argv = ["analyze", "--preset", "tiny", "--phase", "train", "--batch", "2", "--seq", "16"]
    assert main([*argv, "--measure", "--quick", "--json"]) == 0
    out = _json(capsys)
    assert out["measured"]["seconds_median"] > 0
    assert out["roofline"]["mfu"] == pytest.approx(
        out["analytic"]["flops"]
        / out["measured"]["seconds_median"]
        / out["roofline"]["peak_flops_per_s"]
    )
    assert main([*argv, "--quick"]) == 0
    assert "analytic" in capsys.readouterr().out


def test_measure_of_a_model_that_does_not_fit_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    argv = ["analyze", "--preset", "tiny", "--phase", "decode", "--batch", "1", "--seq", "8"]
    assert main([*argv, "--measure", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "measuring decode at B=1 T=8" in err and "available" in err and err.count("\n") == 1
    assert "analyse it without --measure" in err


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--phase", "serve", "--batch", "1", "--seq", "8"], "unknown phase"),
        (["--phase", "train", "--batch", "0", "--seq", "8"], "positive"),
        (["--phase", "prefill", "--batch", "1", "--seq", "-3"], "positive"),
        (["--phase", "decode", "--batch", "1", "--seq", "65"], "max_len=64"),
    ],
)
def test_bad_input_is_one_readable_line(argv, word, capsys):
    assert main(["analyze", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_llama3_8b_analysed_from_shapes(capsys):
    argv = ["analyze", "--preset", "llama3-8b", "--phase", "decode", "--batch", "1", "--seq", "512"]
    assert main([*argv, "--json", "--quick"]) == 0
    out = _json(capsys)
    assert out["analytic"]["params"] == analytic.param_counts(PRESETS["llama3-8b"])["total"]
    assert out["xla"]["flops"] == pytest.approx(out["analytic"]["flops"], rel=FLOP_TOLERANCE)


@pytest.mark.slow
def test_bench_quick_json_lines(capsys):
    assert main(["bench", "--presets", "tiny", "--batches", "1", "2", "--quick", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "calibration" in lines[0]
    rows = lines[1:]
    assert [(r["phase"], r["batch"]) for r in rows] == [
        ("train", 1),
        ("prefill", 1),
        ("decode", 1),
        ("decode", 2),
    ]
    assert all(r["measured"]["seconds_median"] > 0 for r in rows)


def test_calibrate_measures_and_caches(capsys):
    assert main(["calibrate", "--quick", "--json"]) == 0
    first = _json(capsys)
    assert first["f32_flops_per_s"] > 0 and first["copy_bytes_per_s"] > 0 and first["quick"]
    assert main(["calibrate", "--quick", "--json"]) == 0
    assert _json(capsys) == first  # read back from the cache, not measured again
    assert main(["calibrate", "--quick", "--refresh"]) == 0
    assert "calibrated" in capsys.readouterr().out
