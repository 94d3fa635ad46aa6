"""Where each phase's time goes, op by op: training and serving use the machine differently.

    python experiments/ops.py [--preset small] [--dtype bfloat16] [--quick]

``jaxllm profile`` (``jaxllm.opprofile``) of the train step, a prefill and decode steps at three
batch sizes: each call's op time, shared among the ops running at each instant; the share of it
the matrix products take; and the rate those products run at against the device's calibrated
peaks, FLOP/s against the matmul peak and bytes/s against the read bandwidth. Training and prefill
spend their time in products that run near the matmul peak; a decode step spends it in products
that run at the rate of the bytes they read (the weights, and the cache's keys and values), the
more so the smaller the batch. An op's bytes are its operands' and result's sizes, each once.
Each cell's time is also split by the part of the model its ops compute (``opprofile.PARTS``).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

from jaxllm import experiment, hardware, opprofile
from jaxllm.config import ModelConfig

Cell = tuple[str, int, int]  # phase, B, T (decode: the context the step completes)
OTHER_KINDS = 3  # the non-product op kinds named per cell
PARTS = 4  # the parts of the model named per cell


def cells(config: ModelConfig, quick: bool) -> list[Cell]:
    """Train and prefill at a few hundred tokens a call, decode at B = 1, 8 and 32."""
    seq = min(64 if quick else 256, config.max_len)
    return [
        ("train", 2 if quick else 4, seq // 2),
        ("prefill", 1, seq),
        *(("decode", b, seq) for b in (1, 8, 32)),
    ]


def row(cell: Cell, result: opprofile.OpProfile, peaks: hardware.Peaks) -> dict[str, Any]:
    seconds, flops, nbytes = result.products()
    phase, batch, seq = cell
    others: dict[str, float] = defaultdict(float)  # op kind -> seconds of its ops without products
    for op in result.ops:
        if not op.flops:
            others[op.kind] += op.seconds
    ranked = sorted(others.items(), key=lambda kv: -kv[1])[:OTHER_KINDS]
    parts = list(result.by_part().items())
    return {
        "phase": phase,
        "batch": batch,
        "seq": seq,
        "wall_s": result.wall_s,
        "op_s": result.op_s,
        "product_s": seconds,
        "product_share": seconds / result.op_s,
        "product_flops": flops,
        "product_bytes": nbytes,
        "product_flops_per_s": flops / seconds,
        "product_bytes_per_s": nbytes / seconds,
        "of_matmul_peak": flops / seconds / peaks.flops_per_s,
        "of_read_bandwidth": nbytes / seconds / peaks.bandwidth_bytes_per_s,
        "other_kinds": "; ".join(f"{k} {s * 1e3:.3g} ms" for k, s in ranked),
        "backward_share": sum(b for _, (_, b) in parts) / result.op_s,
        "parts": "; ".join(f"{k} {(f + b) / result.op_s:.0%}" for k, (f, b) in parts[:PARTS]),
    }


def label(r: dict[str, Any]) -> str:
    return f"{r['phase']} B={r['batch']}" + (f" ctx {r['seq']}" if r["phase"] == "decode" else "")


def plot(rows: list[dict[str, Any]], path) -> None:
    plt = experiment.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [label(r) for r in rows]
    shares = [r["product_share"] for r in rows]
    ax1.barh(names, shares, label="matrix products")
    ax1.barh(names, [1 - s for s in shares], left=shares, color="lightgray", label="other ops")
    ax1.set(xlabel="share of the op time", title="Where a call's time goes", xlim=(0, 1))
    ax1.invert_yaxis()
    ax1.legend(fontsize=8, loc="lower right")
    y = range(len(rows))
    ax2.barh([i - 0.2 for i in y], [r["of_matmul_peak"] for r in rows], 0.4, label="of matmul peak")
    ax2.barh([i + 0.2 for i in y], [r["of_read_bandwidth"] for r in rows], 0.4, label="of read BW")
    ax2.set_yticks(list(y), names)
    ax2.invert_yaxis()
    ax2.set(xlabel="the products' rate / the calibrated peak", title="How fast the products run")
    ax2.legend(fontsize=8, loc="lower right")
    experiment.save_figure(fig, path)


def summary(rows: list[dict[str, Any]], peaks: hardware.Peaks) -> list[str]:
    lines = [
        f"Peaks ({peaks.source}): matmul ({peaks.matmul}) {peaks.flops_per_s / 1e9:.0f} GFLOP/s, "
        f"read bandwidth {peaks.bandwidth_bytes_per_s / 1e9:.1f} GB/s. Each call profiled after "
        "untimed calls of the same chain; 'ms' is a call without the profiler.",
        "",
        "| cell | ms | products' share of op time | GFLOP/s (of peak) | GB/s (of read BW) | "
        "other ops, most time first | parts of the model, most time first |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {label(r)} | {r['wall_s'] * 1e3:.2f} | {r['product_share']:.0%} | "
            f"{r['product_flops_per_s'] / 1e9:.1f} ({r['of_matmul_peak']:.0%}) | "
            f"{r['product_bytes_per_s'] / 1e9:.1f} ({r['of_read_bandwidth']:.0%}) | "
            f"{r['other_kinds']} | {r['parts']} |"
        )
    lines += [""]
    for r in (rows[0], rows[2]):
        nearer = "matmul peak" if r["of_matmul_peak"] > r["of_read_bandwidth"] else "read bandwidth"
        lines.append(
            f"- {label(r)}: the products run at {r['of_matmul_peak']:.1%} of the matmul peak and "
            f"{r['of_read_bandwidth']:.0%} of the read bandwidth, nearer the {nearer}."
            + (
                " Above the read bandwidth: its bytes came from a cache (the bandwidth is "
                "calibrated on arrays larger than the caches)."
                if r["of_read_bandwidth"] > 1
                else ""
            )
        )
    climb = rows[-1]["product_flops_per_s"] / rows[2]["product_flops_per_s"]
    lines += [
        f"- The train step spends {rows[0]['backward_share']:.0%} of its op time in the backward "
        "pass (ops under a transposed JAX operation), the optimizer's update apart.",
        f"- Decode's products run {climb:.1f}x the FLOP rate at B={rows[-1]['batch']} as at B=1: "
        "the same weights read once serve more rows.",
        "- Bytes are each op's operands and result counted once: exact for a product that "
        "streams its weight, an upper bound where an op reads a slice.",
        "",
        "![where the time goes](ops.png)",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("ops", __doc__, argv)
    config = experiment.model_config(args.preset, args.dtype)
    peaks = hardware.roofline_peaks(hardware.calibrate(quick=args.quick), config.dtype, False)
    calls = 2 if args.quick else 5
    rows = []
    for cell in cells(config, args.quick):
        rows.append(row(cell, opprofile.profile_phase(config, *cell, calls), peaks))
        print(f"{label(rows[-1])}: {rows[-1]['wall_s'] * 1e3:.2f} ms", flush=True)
    experiment.write_csv(args.out / "data.csv", rows)
    plot(rows, args.out / "ops.png")
    experiment.write_summary(
        args.out / "summary.md",
        f"Where the time goes, op by op — {args.preset} ({config.dtype})",
        summary(rows, peaks),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
