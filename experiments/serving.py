"""Serving: static batches, continuous batching and chunked prefill on the same request traces.

    python experiments/serving.py [--preset small] [--quick]

The engine (jaxllm.engine) serves seeded traces of requests (prompt and output lengths uniform) with
each policy. First every request arrives at once, which measures throughput and the engine's
capacity in requests per second; then Poisson arrivals at fractions of that capacity give throughput
against the 99th percentile of the time between tokens (TBT) for each policy; then the chunk size of
chunked prefill is swept at one rate, beside the cost model's prediction (jaxllm.stepcost) of the
step that carries a full chunk. Weights are deterministic filler: speed does not depend on them.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from jaxllm import experiment, hardware
from jaxllm.engine import POLICIES, Engine, StepRecord
from jaxllm.hardware import Peaks
from jaxllm.model import param_shapes
from jaxllm.phases import filler_params
from jaxllm.servebench import replay, summarize
from jaxllm.stepcost import predicted_seconds, step_work
from jaxllm.traces import make_trace


def scale(quick: bool, max_len: int) -> dict[str, Any]:
    """Trace and engine sizes: prompts and outputs within the context, a bounded run time."""
    if quick:
        return {
            "slots": 4,
            "requests": 12,
            "prompts": (4, 24),
            "outputs": (4, 24),
            "chunks": [8, 16],
        }
    longest = min(128, max_len // 2)
    return {
        "slots": 8,
        "requests": 32,
        "prompts": (16, longest),
        "outputs": (16, min(128, max_len - longest)),
        "chunks": [16, 32, 64, 128],
    }


def run(engine: Engine, size: dict[str, Any], rate: float, seed: int) -> dict[str, Any]:
    trace = make_trace(size["requests"], rate, size["prompts"], size["outputs"], seed)
    out = summarize(engine, replay(engine, trace, seed))
    out["rate"] = rate
    print(
        f"{engine.policy:>10} chunk {engine.chunk:>3} rate {rate:6.1f}/s: "
        f"{out['tokens_per_s']:6.0f} tokens/s, TBT p99 {1e3 * out['tbt_s']['p99']:6.1f} ms, "
        f"TTFT p50 {1e3 * out['ttft_s']['p50']:7.1f} ms",
        flush=True,
    )
    return out


def flat(row: dict[str, Any]) -> experiment.Row:
    """One CSV row of a run (seconds; chunk and prediction empty where they do not apply)."""
    return {
        "policy": row["policy"],
        "chunk": row.get("chunk") or "",
        "rate": "all at once" if math.isinf(row["rate"]) else row["rate"],
        "tokens_per_s": row["tokens_per_s"],
        "ttft_p50_s": row["ttft_s"]["p50"],
        "tbt_p50_s": row["tbt_s"]["p50"],
        "tbt_p99_s": row["tbt_s"]["p99"],
        "occupancy": row["occupancy"],
        "wasted_flops_fraction": row["wasted_flops_fraction"],
        "predicted_mixed_step_s": row.get("predicted_s", ""),
    }


def chunk_prediction(engine: Engine, peaks: Peaks) -> float:
    """Predicted seconds of a chunked step carrying every slot's decode and a full chunk that reads
    half the cache: the TBT of a request decoding while a long prompt is prefilled."""
    S, B, C = engine.capacity, engine.slots, engine.chunk
    record = StepRecord(True, True, 1, C, (S // 2,) * B, ((S // 2, C),), 0.0)
    work = step_work(engine.config, record, B, S, engine.cache.k[0].dtype)
    return predicted_seconds(work, peaks.flops_per_s, peaks.bandwidth_bytes_per_s)


def mixed_step_seconds(engine: Engine, start: int) -> float | None:
    """Median measured seconds of the chunked steps (decodes beside a chunk) since ``start``."""
    mixed = [r.seconds for r in list(engine.records)[start:] if r.decode and r.lanes]
    return float(np.median(mixed)) if mixed else None


def plot(policies: list[dict[str, Any]], chunks: list[dict[str, Any]], path) -> None:
    plt = experiment.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, marker in zip(POLICIES, "os^", strict=True):
        rows = [r for r in policies if r["policy"] == policy]
        ax1.plot(
            [1e3 * r["tbt_s"]["p99"] for r in rows],
            [r["tokens_per_s"] for r in rows],
            marker + "-",
            label=policy,
        )
    ax1.set(xlabel="TBT p99 (ms)", ylabel="tokens/s", title="Throughput against tail latency")
    ax1.legend(fontsize=8)
    sizes = [r["chunk"] for r in chunks]
    ax2.plot(sizes, [1e3 * r["tbt_s"]["p99"] for r in chunks], "o-", label="TBT p99, measured")
    ax2.plot(
        sizes,
        [1e3 * (r["mixed_step_s"] or math.nan) for r in chunks],
        "s-",
        label="mixed step, median",
    )
    ax2.plot(sizes, [1e3 * r["predicted_s"] for r in chunks], "^--", label="mixed step, cost model")
    ax2.set(xscale="log", xlabel="chunk (prompt tokens per step)", ylabel="ms", title="Chunk size")
    ax2.legend(fontsize=8)
    experiment.save_figure(fig, path)


def summary_lines(
    policies: list[dict[str, Any]], chunks: list[dict[str, Any]], capacity: float
) -> list[str]:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1e3 * x:.2f}"

    lines = [
        f"Capacity (continuous, every request at once): {capacity:.1f} requests/s.",
        "",
        "| policy | rate (req/s) | tokens/s | TTFT p50 | TBT p50 | TBT p99 | occupancy | wasted FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in policies:
        rate = "all at once" if math.isinf(r["rate"]) else f"{r['rate']:.1f}"
        lines.append(
            f"| {r['policy']} | {rate} | {r['tokens_per_s']:.0f} | {ms(r['ttft_s']['p50'])} ms | "
            f"{ms(r['tbt_s']['p50'])} ms | {ms(r['tbt_s']['p99'])} ms | {r['occupancy']:.0%} | "
            f"{r['wasted_flops_fraction']:.0%} |"
        )
    burst = {r["policy"]: r["tokens_per_s"] for r in policies if math.isinf(r["rate"])}
    lines += [
        "",
        f"All at once, continuous batching serves {burst['continuous'] / burst['static']:.2f}x the "
        f"tokens/s of static batches, chunked prefill {burst['chunked'] / burst['static']:.2f}x.",
        "",
        "| chunk | tokens/s | TBT p99 | mixed step (median) | mixed step (cost model) |",
        "|---|---|---|---|---|",
    ]
    for r in chunks:
        lines.append(
            f"| {r['chunk']} | {r['tokens_per_s']:.0f} | {ms(r['tbt_s']['p99'])} ms | "
            f"{ms(r['mixed_step_s'])} ms | {ms(r['predicted_s'])} ms |"
        )
    lines += [
        "",
        "TBT: seconds between consecutive tokens of one request, pooled over requests. Wasted FLOPs: "
        "the executed program's matmul FLOPs (padding, idle slots, full-capacity attention) beyond "
        "what the requests needed (jaxllm.stepcost). The cost model's mixed step carries every "
        "slot's decode at half the capacity and a full chunk reading half the capacity, on the "
        "roofline of the calibrated peaks.",
        "",
        "![serving](serving.png)",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("serving", __doc__, argv)
    config = experiment.model_config(args.preset, args.dtype).replace(scan_layers=False)
    params = filler_params(param_shapes(config))
    size = scale(args.quick, config.max_len)
    longest = size["prompts"][1]
    engines = {}
    for policy in POLICIES:
        engines[policy] = Engine(config, params, slots=size["slots"], policy=policy, chunk=64)
        engines[policy].compile_programs(longest)
    burst = [run(engines[p], size, math.inf, seed=0) for p in POLICIES]
    capacity = (
        size["requests"] / next(r for r in burst if r["policy"] == "continuous")["makespan_s"]
    )
    rates = [0.5 * capacity, 0.8 * capacity]
    policies = burst + [run(engines[p], size, rate, seed=1) for rate in rates for p in POLICIES]
    peaks = hardware.roofline_peaks(hardware.calibrate(), config.dtype)
    chunks = []
    for chunk in size["chunks"]:
        engine = Engine(config, params, slots=size["slots"], policy="chunked", chunk=chunk)
        engine.compile_programs(longest)
        row = run(engine, size, rates[-1], seed=1)
        row.update(chunk=chunk, mixed_step_s=mixed_step_seconds(engine, 0))
        row["predicted_s"] = chunk_prediction(engine, peaks)
        chunks.append(row)
    experiment.write_json(args.out / "data.json", {"policies": policies, "chunks": chunks})
    experiment.write_csv(args.out / "data.csv", [flat(r) for r in policies + chunks])
    plot(policies, chunks, args.out / "serving.png")
    title = f"Serving policies — {args.preset}, {size['slots']} slots"
    experiment.write_summary(
        args.out / "summary.md", title, summary_lines(policies, chunks, capacity)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
