"""Replaying a request trace through the engine, and what the run measured.

``replay`` submits each request when the wall clock passes its arrival (prompts: seeded random token
ids, drawn once the engine accepts the request's sizes; no stop tokens, so each request generates
exactly its ``output_len``), steps the engine while it has work and sleeps until the next arrival
when it has none. Per request: time to first token (TTFT,
from arrival), times between tokens (TBT), end-to-end latency. Per run: generated tokens per second of
the run's makespan, slot occupancy of decode steps, prompt padding, and the FLOPs the static shapes
wasted (``jaxllm.stepcost``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxllm import memory
from jaxllm.cache import cache_dtype
from jaxllm.engine import Engine, Request, StepRecord
from jaxllm.errors import InputError
from jaxllm.hardware import Peaks
from jaxllm.stepcost import StepWork, predicted_seconds, step_work
from jaxllm.traces import TraceRequest

MAX_SLEEP = 1.0  # seconds of one wait for an arrival: a wait of centuries overflows time.sleep
# Host bytes a replay holds per request beside its tokens (its trace entry, Request and events: about
# 1.4 KB measured) and per token (a generated token's id and time in lists: 68 for an id above 256,
# which CPython does not share; a prompt token's int32 id: 4). The engine's step records (at most
# MAX_RECORDS) are not counted. tests/test_engine.py measures a replay against the estimate.
REQUEST_BYTES, TOKEN_BYTES = 2048, 80


@dataclasses.dataclass(frozen=True)
class Run:
    """A replayed trace: the requests as the engine left them and every step it ran."""

    trace: list[TraceRequest]
    requests: list[Request | None]  # None: refused at submit (see ``refused``)
    refused: list[str]  # why, one line per refused request, in trace order
    records: list[StepRecord]
    start: float  # engine clock at time 0 of the trace
    makespan: float  # seconds from time 0 to the last request's end


def check_memory(requests: int, tokens: int) -> None:
    """InputError, before the trace is made, if replaying ``requests`` requests of up to ``tokens``
    tokens each (prompt and output) may need more host memory than this process may use."""
    need, free = requests * (REQUEST_BYTES + TOKEN_BYTES * tokens), memory.host_bytes()
    if need > free:
        raise InputError(
            f"{requests} requests of up to {tokens} tokens may need {memory.gib(need)} of host "
            f"memory to replay, but this process may use {memory.gib(free)}"
        )


def replay(engine: Engine, trace: Sequence[TraceRequest], seed: int = 0) -> Run:
    """Run ``trace`` through ``engine`` in real time (compile its programs first: a compile inside
    the run is counted as latency)."""
    rng = np.random.default_rng(seed)
    requests: list[Request | None] = []
    refused: list[str] = []
    first = len(engine.records)
    start, i = engine.clock(), 0
    while i < len(trace) or not engine.idle:
        now = engine.clock() - start
        while i < len(trace) and trace[i].arrival <= now:
            try:
                requests.append(_submit(engine, trace[i], rng))
            except ValueError as err:
                requests.append(None)
                refused.append(f"request {i}: {err}")
            i += 1
        if engine.idle and i < len(trace):
            wait = trace[i].arrival - (engine.clock() - start)
            time.sleep(min(max(wait, 0.0), MAX_SLEEP))
            continue
        engine.step()
    ends = [r.finished for r in requests if r is not None and r.finished is not None]
    makespan = (max(ends) - start) if ends else 0.0
    return Run(list(trace), requests, refused, list(engine.records)[first:], start, makespan)


def _submit(engine: Engine, request: TraceRequest, rng: np.random.Generator) -> Request:
    """``request`` submitted with a random prompt, drawn only once the engine accepts its sizes (a
    trace may ask for a prompt longer than memory holds)."""
    engine.check_lengths(request.prompt_len, request.output_len)
    prompt = rng.integers(0, engine.config.vocab_size, request.prompt_len)
    return engine.submit(prompt, request.output_len)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    a = np.asarray(values)
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def request_latencies(run: Run) -> dict[str, list[float]]:
    """TTFT and end-to-end seconds per served request (from its arrival), and every TBT pooled."""
    ttft, tbt, e2e = [], [], []
    for t, r in zip(run.trace, run.requests, strict=True):
        if r is None or not r.times or r.finished is None:
            continue
        arrival = run.start + t.arrival
        ttft.append(r.times[0] - arrival)
        tbt += np.diff(r.times).tolist()
        e2e.append(r.finished - arrival)
    return {"ttft": ttft, "tbt": tbt, "e2e": e2e}


def work(engine: Engine, run: Run) -> list[StepWork]:
    """The closed-form work of each step of the run."""
    kv = cache_dtype(engine.config)
    return [step_work(engine.config, rec, engine.slots, engine.capacity, kv) for rec in run.records]


def summarize(engine: Engine, run: Run) -> dict[str, Any]:
    """The run's figures, as printed by ``jaxllm serve-bench --json`` (seconds, tokens, FLOPs)."""
    lat = request_latencies(run)
    served = [r for r in run.requests if r is not None]
    generated = sum(len(r.tokens) for r in served)
    decode_steps = [rec for rec in run.records if rec.decode]
    lanes = [rec for rec in run.records if rec.lanes]
    steps = work(engine, run)
    executed = sum(w.executed_flops for w in steps)
    return {
        "policy": engine.policy,
        "slots": engine.slots,
        "chunk": engine.chunk if engine.policy == "chunked" else None,
        "requests": len(run.trace),
        "refused": len(run.refused),
        "generated_tokens": generated,
        "makespan_s": run.makespan,
        "tokens_per_s": generated / run.makespan if run.makespan > 0 else 0.0,
        "ttft_s": _percentiles(lat["ttft"]),
        "tbt_s": _percentiles(lat["tbt"]),
        "e2e_s": _percentiles(lat["e2e"]),
        "steps": len(run.records),
        "step_seconds": sum(rec.seconds for rec in run.records),
        "occupancy": float(np.mean([len(r.live) / engine.slots for r in decode_steps]))
        if decode_steps
        else 0.0,
        "padding_tokens": sum(r.lanes * r.chunk - sum(n for _, n in r.chunks) for r in lanes),
        "executed_flops": executed,
        "wasted_flops_fraction": 1 - sum(w.useful_flops for w in steps) / executed
        if executed
        else 0.0,
    }


def programs(engine: Engine, run: Run, peaks: Peaks) -> list[dict[str, Any]]:
    """Per compiled program the run used: steps, median measured seconds, and the predicted seconds
    of the closed-form cost model and of XLA's cost analysis of the same executable (each on the
    roofline of ``peaks``: ``hardware.roofline_peaks``)."""
    from jaxllm.cost import analyze_compiled

    flops_per_s, bandwidth = peaks.flops_per_s, peaks.bandwidth_bytes_per_s
    by_shape: dict[tuple[bool, bool, int, int], list[tuple[StepRecord, StepWork]]] = {}
    for rec, w in zip(run.records, work(engine, run), strict=True):
        by_shape.setdefault((rec.decode, rec.read, rec.lanes, rec.chunk), []).append((rec, w))
    rows = []
    for shape, steps in sorted(by_shape.items()):
        xla = analyze_compiled(engine.compiled[shape], 0.0)
        analytic = steps[0][1]  # the executed work depends on the shape alone
        rows.append(
            {
                "decode": shape[0],
                "read": shape[1],
                "lanes": shape[2],
                "chunk": shape[3],
                "steps": len(steps),
                "measured_s": float(np.median([rec.seconds for rec, _ in steps])),
                "analytic_flops": analytic.executed_flops,
                "analytic_bytes": analytic.bytes,
                "xla_flops": xla.flops,
                "xla_bytes": xla.bytes_accessed,
                "predicted_s": predicted_seconds(analytic, flops_per_s, bandwidth),
                "xla_predicted_s": predicted_seconds(
                    dataclasses.replace(
                        analytic, executed_flops=int(xla.flops), bytes=int(xla.bytes_accessed)
                    ),
                    flops_per_s,
                    bandwidth,
                ),
            }
        )
    return rows


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """``summarize``'s figures as text (milliseconds for latencies)."""

    def ms(p: dict[str, float | None]) -> str:
        values = (p["p50"], p["p99"])
        return "/".join("-" if v is None else f"{1e3 * v:.1f}" for v in values)

    chunk = f", chunk {summary['chunk']}" if summary["chunk"] else ""
    return [
        f"policy {summary['policy']}, {summary['slots']} slots{chunk}: {summary['requests']} "
        f"requests ({summary['refused']} refused), {summary['generated_tokens']} tokens in "
        f"{summary['makespan_s']:.2f} s = {summary['tokens_per_s']:.0f} tokens/s",
        f"TTFT p50/p99 {ms(summary['ttft_s'])} ms, TBT p50/p99 {ms(summary['tbt_s'])} ms, "
        f"end-to-end p50/p99 {ms(summary['e2e_s'])} ms",
        f"{summary['steps']} steps, slot occupancy {summary['occupancy']:.0%}, prompt padding "
        f"{summary['padding_tokens']} tokens, FLOPs wasted on padding and idle slots "
        f"{summary['wasted_flops_fraction']:.0%}",
    ]
