"""The serving engine against ``generate`` and the full forward pass, for every policy."""

import functools
import json
import re
import threading
import tracemalloc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FLOP_TOLERANCE

from jaxllm import checkpoint, memory, serve, servebench
from jaxllm.cli import main
from jaxllm.config import PRESETS
from jaxllm.cost import analyze_compiled
from jaxllm.engine import POLICIES, Engine, SamplingParams, StepRecord, _blank_input
from jaxllm.generate import generate
from jaxllm.model import Transformer, init_params
from jaxllm.servebench import replay, summarize
from jaxllm.slots import SlotCache
from jaxllm.step import StepInput, make_step
from jaxllm.stepcost import step_work
from jaxllm.traces import TraceRequest, load_trace, make_trace, parse_lengths, save_trace

GPT2 = PRESETS["tiny"].replace(n_kv_heads=2)
LLAMA = GPT2.replace(
    norm="rmsnorm", positions="rotary", mlp="swiglu", use_bias=False, tie_embeddings=False
)
PROMPT_LENS, NEW = (11, 7, 20, 3, 30, 5), (9, 20, 5, 12, 30, 4)


@functools.cache
def params_of(cfg):
    return init_params(cfg, jax.random.key(0))


def prompts(lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 257, size=n).astype(np.int32) for n in lens]


@functools.cache
def alone(cfg):
    """Each prompt's greedy tokens from generate (a left-padded batch gives each row what it gives
    alone: tests/test_serve.py)."""
    return generate(cfg, params_of(cfg), prompts(), list(NEW)).tokens


@pytest.mark.parametrize(
    "cfg", [GPT2, pytest.param(LLAMA, marks=pytest.mark.slow)], ids=["gpt2", "llama"]
)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_each_request_its_greedy_tokens_alone(cfg, policy):
    engine = Engine(cfg, params_of(cfg), slots=2, policy=policy, chunk=8)
    requests = [engine.submit(x, n) for x, n in zip(prompts(), NEW, strict=True)]
    engine.run_until_idle()
    assert [r.tokens for r in requests] == alone(cfg)
    assert all(r.finish == "length" for r in requests)
    assert not any(engine.running) and not engine.waiting


def _flat_step(cfg, cache, **fields):
    B = cache.slots
    inp = _blank_input(B, *fields.pop("shape"))
    for name, value in fields.items():
        getattr(inp, name)[...] = value
    return inp


def test_step_logits_equal_the_full_forward_pass_in_every_segment():
    """Two fresh prompts as lanes, then one step with two decodes beside a continued chunk: each
    logits row equals the full forward pass at that position (f32, 1e-5)."""
    cfg = serve.serving_config(LLAMA)
    params = params_of(cfg)
    seqs = prompts((11, 7, 20))

    forward = [
        np.asarray(
            Transformer(cfg).apply({"params": params}, s[None], np.arange(len(s))[None])[0][0]
        )
        for s in seqs
    ]

    def full(s, t):
        return forward[next(i for i, x in enumerate(seqs) if x is s)][t]

    cache = SlotCache.init(cfg, 4, 32)
    lanes = np.zeros((2, 8), np.int32)
    lanes[0, :5], lanes[1, :4] = seqs[0][:5], seqs[1][:4]
    inp = _blank_input(4, 2, 8).replace(
        lane_tokens=lanes, lane_slot=np.array([2, 0], np.int32), lane_len=np.array([5, 4], np.int32)
    )
    logits, cache = make_step(cfg, False, False)(params, cache, inp)
    np.testing.assert_allclose(logits[0], full(seqs[0], 4), atol=1e-5)
    np.testing.assert_allclose(logits[1], full(seqs[1], 3), atol=1e-5)
    for start, n in ((0, 6), (6, 8)):
        lane = np.zeros((1, 8), np.int32)
        lane[0, :n] = seqs[2][start : start + n]
        dec_tokens, dec_pos = np.zeros(4, np.int32), np.zeros(4, np.int32)
        dec_tokens[[2, 0]] = seqs[0][5 + start // 6], seqs[1][4 + start // 6]
        dec_pos[[2, 0]] = 5 + start // 6, 4 + start // 6
        inp = StepInput(
            dec_tokens, dec_pos, np.array([True, False, True, False]), lane,
            np.array([1], np.int32), np.array([start], np.int32), np.array([n], np.int32),
        )  # fmt: skip
        logits, cache = make_step(cfg, True, start > 0)(params, cache, inp)
        np.testing.assert_allclose(logits[2], full(seqs[0], dec_pos[2]), atol=1e-5)
        np.testing.assert_allclose(logits[0], full(seqs[1], dec_pos[0]), atol=1e-5)
        np.testing.assert_allclose(logits[4], full(seqs[2], start + n - 1), atol=1e-5)


def test_a_reused_slot_does_not_leak_the_previous_request():
    """One slot: a request that runs after others in it gives what it gives on a fresh engine."""
    engine = Engine(GPT2, params_of(GPT2), slots=1, policy="continuous")
    for x, n in zip(prompts()[:3], NEW[:3], strict=True):
        engine.submit(x, n)
    last = engine.submit(prompts()[3], NEW[3])
    engine.run_until_idle()
    assert last.tokens == alone(GPT2)[3]


def test_sampled_tokens_depend_on_the_seed_not_on_the_batch():
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    outputs = []
    for policy, others in (("continuous", 0), ("chunked", 3), ("static", 5)):
        engine = Engine(GPT2, params_of(GPT2), slots=2, policy=policy, chunk=8)
        for x in prompts()[:others]:
            engine.submit(x, 10, SamplingParams(temperature=0.5, seed=1))
        r = engine.submit(prompts()[4], 12, sampling)
        engine.run_until_idle()
        outputs.append(r.tokens)
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0] != alone(GPT2)[4][:12]  # sampled, not greedy


def test_a_stop_token_ends_the_request_without_being_output():
    expected = alone(GPT2)[1]
    stop = expected[3]
    engine = Engine(GPT2, params_of(GPT2), slots=2)
    r = engine.submit(prompts()[1], NEW[1], stop=[stop])
    engine.run_until_idle()
    assert r.tokens == expected[: expected.index(stop)] and r.finish == "stop"


def test_cancel_frees_the_slot_at_the_next_step():
    engine = Engine(GPT2, params_of(GPT2), slots=1)
    first, second = engine.submit(prompts()[0], 30), engine.submit(prompts()[1], NEW[1])
    for _ in range(3):
        engine.step()
    engine.cancel(first.id)
    events = engine.step()
    assert events[0].finish == "cancelled" and events[0].request == first.id
    assert engine.running[0] is second  # admitted in the same step
    engine.run_until_idle()
    assert first.finish == "cancelled" and len(first.tokens) == 3
    assert second.tokens == alone(GPT2)[1]


def test_static_admits_the_next_batch_only_when_the_last_one_has_finished():
    engine = Engine(GPT2, params_of(GPT2), slots=2, policy="static")
    requests = [engine.submit(x, n) for x, n in zip(prompts(), NEW, strict=True)]
    engine.run_until_idle()
    for k in range(0, len(requests) - 2, 2):
        assert max(r.finished or 0.0 for r in requests[k : k + 2]) <= min(
            r.times[0] for r in requests[k + 2 : k + 4]
        )


def test_chunked_prefills_a_long_prompt_over_steps_beside_the_decodes():
    engine = Engine(GPT2, params_of(GPT2), slots=2, policy="chunked", chunk=8)
    engine.submit(prompts()[0], 20)
    engine.step()
    engine.submit(prompts()[4], 4)  # 30 tokens: four chunks of at most 8
    engine.run_until_idle()
    mixed = [rec for rec in engine.records if rec.decode and rec.lanes]
    assert [rec.chunks[0] for rec in mixed] == [(0, 8), (8, 8), (16, 8), (24, 6)]
    assert all(len(rec.live) == 1 for rec in mixed)


def test_bad_requests_are_refused_with_one_line_and_the_others_go_on():
    engine = Engine(GPT2, params_of(GPT2), slots=2)
    with pytest.raises(
        ValueError, match=r"60 tokens \+ max_new_tokens 5 = 65 is beyond the context \(max_len\) 64"
    ):
        engine.submit(np.ones(60, np.int32), 5)
    with pytest.raises(ValueError, match="token id 300"):
        engine.submit([1, 300], 5)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], 5)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        engine.submit([1], 0)
    trace = make_trace(3, float("inf"), [10, 70], [4], seed=3)
    run = replay(engine, trace)
    served = [r for r in run.requests if r is not None]
    assert len(run.refused) == sum(t.prompt_len == 70 for t in trace) == 3 - len(served)
    assert all(len(r.tokens) == 4 for r in served) and "beyond the context" in run.refused[0]


def test_a_prompt_longer_than_memory_is_refused_by_name_without_being_drawn():
    engine = Engine(GPT2, params_of(GPT2), slots=2)
    trace = [TraceRequest(0.0, 10**11, 4), TraceRequest(0.0, 5, 4)]  # 745 GiB of int64 ids
    run = replay(engine, trace)
    assert run.refused == [
        "request 0: prompt of 100000000000 tokens + max_new_tokens 4 = 100000000004 is beyond "
        "the context (max_len) 64"
    ]
    assert run.requests[0] is None and run.requests[1] is not None
    assert len(run.requests[1].tokens) == 4


def test_replay_waits_for_a_late_arrival_in_short_sleeps(monkeypatch):
    """time.sleep refuses a wait of centuries: replay sleeps at most MAX_SLEEP at a time."""
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(servebench.time, "sleep", sleep)
    engine = Engine(GPT2, params_of(GPT2), slots=2, clock=lambda: now[0])
    run = replay(engine, [TraceRequest(0.0, 5, 2), TraceRequest(3.5, 5, 2)])
    assert all(r is not None and len(r.tokens) == 2 for r in run.requests)
    assert max(sleeps) <= servebench.MAX_SLEEP and sum(sleeps) == pytest.approx(3.5)


def test_engine_and_trace_arguments_are_checked():
    cases: list[tuple[dict[str, Any], str]] = [
        ({"chunk": 0}, "chunk must be a positive integer, got 0"),
        ({"policy": "fifo"}, "unknown policy 'fifo'"),
        ({"capacity": 65}, "capacity 65 is beyond the model's context"),
        ({"slots": 0}, "slots must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            Engine(GPT2, params_of(GPT2), **kwargs)
    with pytest.raises(ValueError, match="at least one request, got 0"):
        make_trace(0, 1.0, [4], [4])
    with pytest.raises(ValueError, match="rate must be > 0"):
        make_trace(4, 0.0, [4], [4])
    with pytest.raises(ValueError, match="range 9-3 is empty"):
        make_trace(4, 1.0, (9, 3), [4])
    with pytest.raises(ValueError, match="LO-HI"):
        parse_lengths("a-b")
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be at most 2147483647"):
        SamplingParams(top_k=2**31)


@pytest.mark.parametrize("command", ["serve-bench", "serve"])
def test_slots_whose_cache_outgrows_memory_are_refused_before_loading(
    command, tmp_path, monkeypatch, capsys
):
    tiny = PRESETS["tiny"]
    run = tmp_path / "run"
    checkpoint.save(checkpoint.manager(run), 1, params_of(tiny), None, tiny)
    monkeypatch.setattr(checkpoint, "load_params", lambda *_, **__: pytest.fail("loaded"))
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)
    slots = 2**31 - 1
    assert main([command, "--checkpoint", str(run), "--slots", str(slots)]) == 2
    err = capsys.readouterr().err
    # float32 K and V of every layer, head and position of every slot
    cache = 2 * 4 * slots * tiny.max_len * tiny.n_layers * tiny.n_kv_heads * tiny.head_dim
    assert f"slots {slots} of capacity 64 need a {cache / 2**30:.2f} GiB KV cache" in err
    assert "this process may use 1.00 GiB" in err and err.count("\n") == 1


def test_the_replay_memory_estimate_bounds_what_a_replay_allocates():
    """tracemalloc's peak of making and replaying a trace, per request, against the estimate that
    refuses --requests (servebench.check_memory): above it, but not by more than 2.5x."""
    engine = Engine(GPT2, params_of(GPT2), slots=8)  # 2.5 steps a request: few step records
    engine.compile_programs(10)  # before tracing: compiling allocates too
    tracemalloc.start()
    try:
        replay(engine, make_trace(200, float("inf"), [10], [20]))
        peak = tracemalloc.get_traced_memory()[1] / 200
    finally:
        tracemalloc.stop()
    estimate = servebench.REQUEST_BYTES + servebench.TOKEN_BYTES * 30
    assert peak <= estimate <= 2.5 * peak


def test_serve_bench_refuses_a_trace_outgrowing_host_memory(monkeypatch, capsys):
    monkeypatch.setattr(memory, "host_bytes", lambda: 2**30)
    monkeypatch.setattr(servebench, "replay", lambda *_: pytest.fail("replayed"))
    assert main(["serve-bench", "--preset", "tiny", "--requests", "2147483647"]) == 2
    err = capsys.readouterr().err
    need = 2147483647 * (servebench.REQUEST_BYTES + servebench.TOKEN_BYTES * 64)  # 64: max_len
    assert f"2147483647 requests of up to 64 tokens may need {need / 2**30:.2f} GiB" in err
    assert "this process may use 1.00 GiB" in err and err.count("\n") == 1


def test_traces_round_trip_and_arrive_as_a_poisson_process(tmp_path, capsys):
    trace = make_trace(2000, 50.0, (16, 128), [8, 32], seed=1)
    gaps = np.diff([r.arrival for r in trace])
    assert trace[0].arrival == 0 and abs(gaps.mean() - 1 / 50) < 0.1 / 50  # mean gap 1/rate
    assert abs(np.std(gaps) / gaps.mean() - 1) < 0.1  # exponential: coefficient of variation 1
    assert {r.output_len for r in trace} == {8, 32}
    assert min(r.prompt_len for r in trace) == 16 and max(r.prompt_len for r in trace) == 128
    save_trace(tmp_path / "new" / "t.jsonl", trace)  # its folder made
    assert load_trace(tmp_path / "new" / "t.jsonl") == trace
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no requests"):
        load_trace(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"arrival": 1, "prompt_len": 0, "output_len": 3}\n')
    with pytest.raises(ValueError, match=r"line 1.*prompt_len must be a positive integer, got 0"):
        load_trace(tmp_path / "bad.jsonl")
    (tmp_path / "late.jsonl").write_text('{"arrival": 1e30, "prompt_len": 5, "output_len": 3}\n')
    with pytest.raises(ValueError, match=r"line 1.*arrival must be in \[0, 9223372036\] s"):
        load_trace(tmp_path / "late.jsonl")
    assert TraceRequest(threading.TIMEOUT_MAX, 5, 3).arrival == threading.TIMEOUT_MAX
    (tmp_path / "bytes.jsonl").write_bytes(
        b'{"arrival": 0, "prompt_len": 1, "output_len": 1}\n\xfe\n'
    )
    assert main(["serve-bench", "--preset", "tiny", "--trace", str(tmp_path / "bytes.jsonl")]) == 2
    message = f"{tmp_path / 'bytes.jsonl'} is not UTF-8 text: byte 0xfe at offset 49"
    assert capsys.readouterr().err == f"jaxllm: error: {message}\n"
    for flag, path, message in [
        ("--trace", tmp_path / "absent.jsonl", f"no file at '{tmp_path / 'absent.jsonl'}'"),
        ("--trace", tmp_path, f"'{tmp_path}' is not a file"),
        ("--save-trace", tmp_path, f"'{tmp_path}' is not a file name"),
        ("--save-trace", tmp_path / "bad.jsonl" / "t", "bad.jsonl' cannot be a directory"),
    ]:
        assert main(["serve-bench", "--preset", "tiny", flag, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err and message in err and err.count("\n") == 1


def test_no_program_copies_the_whole_cache():
    """Every step program updates the donated cache in place: no copy of a layer's [B, K, S, H]."""
    engine = Engine(GPT2, params_of(GPT2), slots=4, policy="chunked", chunk=16)
    layer = f"f32[4,{GPT2.n_kv_heads},{GPT2.max_len},{GPT2.head_dim}]"
    for decode, read, P, C in engine.shapes(30):
        hlo = engine.program(decode, read, _blank_input(4, P, C)).as_text()
        copies = [
            line for line in hlo.splitlines() if re.search(rf"= {re.escape(layer)}\S* copy\(", line)
        ]
        assert not copies, (decode, read, P, C, copies[:2])


def test_the_step_cost_model_counts_what_xla_counts():
    """Executed FLOPs of the closed-form model (its products) near XLA's for every program shape.

    XLA also counts elementwise work, which this small model makes visible: the decode step with a
    32-token chunk counted 2.8% over the closed form on a CPU, 5.9% on an H200 (33.93e6 against
    32.05e6), whose optimized program holds more of it."""
    cfg = GPT2.replace(d_model=128, d_ff=512, n_heads=4, max_len=128)
    engine = Engine(cfg, params_of(cfg), slots=4, policy="chunked", chunk=32)
    for decode, read, P, C in ((True, False, 0, 1), (True, True, 1, 32), (False, False, 2, 16)):
        xla = analyze_compiled(engine.program(decode, read, _blank_input(4, P, C)), 0.0)
        chunks = ((0, C),) * P
        record = StepRecord(decode, read, P, C, (0,) * 4 if decode else (), chunks, 0.0)
        work = step_work(engine.config, record, 4, 128, jnp.float32)
        tolerance = FLOP_TOLERANCE if jax.default_backend() == "cpu" else 0.08
        assert work.executed_flops == pytest.approx(xla.flops, rel=tolerance), (
            decode,
            read,
            P,
            C,
        )


def test_replay_summary_counts_every_generated_token():
    engine = Engine(GPT2, params_of(GPT2), slots=2, policy="continuous")
    trace = make_trace(6, 200.0, (3, 20), (2, 9), seed=2)
    summary = summarize(engine, replay(engine, trace))
    assert summary["generated_tokens"] == sum(t.output_len for t in trace)
    assert summary["refused"] == 0 and 0 < summary["occupancy"] <= 1
    assert summary["ttft_s"]["p50"] > 0 and summary["tbt_s"]["p99"] >= summary["tbt_s"]["p50"]
    assert 0 <= summary["wasted_flops_fraction"] < 1


def test_serve_bench_cli_prints_the_run(capsys, tmp_path):
    argv = ["serve-bench", "--preset", "tiny", "--requests", "4", "--prompt-lens", "3-9"]
    trace = tmp_path / "trace.jsonl"
    argv += ["--output-lens", "2-5", "--slots", "2", "--save-trace", str(trace)]
    assert main([*argv, "--policy", "static,chunked", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["policy"] for r in runs] == ["static", "chunked"]
    expected = sum(r.output_len for r in load_trace(trace))
    for out in runs:
        assert out["requests"] == 4 and out["refused"] == 0 and out["programs_compiled"] >= 2
        assert out["generated_tokens"] == expected
        assert {p["decode"] for p in out["programs"]} == {True, False}
    assert main(["serve-bench", "--preset", "tiny", "--rate", "0"]) == 2
    assert "rate must be > 0" in capsys.readouterr().err
    assert main(["serve-bench", "--preset", "tiny", "--policy", "static,fifo"]) == 2
    assert "unknown policy 'fifo'" in capsys.readouterr().err
