"""Estimate against clock: how far XLA's figures and the closed forms are from what runs.

    python experiments/estimates.py [--preset small] [--quick]

For every phase: XLA-predicted time (its loop-corrected FLOPs and bytes on the calibrated roofline)
over the measured median time, and the analytic FLOPs over XLA's FLOPs. Each gap comes with the
data that explains it: dispatch overhead (the time of an empty jitted call against the step),
loop under-counting (XLA's raw FLOPs, each loop body counted once, against the corrected count),
fusion and copies (XLA's bytes against the analytic compulsory bytes), caches (a working set small
enough to stay in CPU caches beats the DRAM bandwidth roof), and compute below peak (MFU).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import experiment
from jaxllm.measure import PhaseResult, analyze_phase


def dispatch_seconds(repeats: int = 200) -> float:
    """Median wall time of calling a compiled trivial program and waiting for it."""
    f = jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile()
    x = jnp.zeros((), jnp.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gaps(result: PhaseResult, dispatch: float) -> dict[str, float]:
    """The ratios this experiment is about for one measured phase; ``dispatch``: seconds of an empty
    compiled call."""
    x, a = result.xla, result.analytic
    return {
        "predicted_over_measured": result.roofline.xla.predicted_seconds / result.seconds,
        "analytic_over_xla_flops": a.flops / x.flops,
        "raw_over_corrected_flops": x.raw_flops / x.flops,
        "xla_over_analytic_bytes": x.bytes_accessed / a.bytes,
        "dispatch_seconds": dispatch,
        "dispatch_share": dispatch / result.seconds,
    }


def reasons(row: experiment.Row) -> str:
    """The gaps one row (``PhaseResult.flat()`` and ``gaps``) shows, largest first, in words."""
    out = []
    if row["dispatch_share"] > 0.05:
        out.append(f"dispatch is {row['dispatch_share']:.0%} of the step")
    if row["raw_over_corrected_flops"] < 0.95:
        why = (
            "XLA counts loop bodies once"
            if row["xla_loops"]
            else "the backend's own count leaves out its library calls (cuBLAS, cuDNN)"
        )
        out.append(
            f"{why}: raw FLOPs are {row['raw_over_corrected_flops']:.0%} of the corrected count"
        )
    if row["xla_over_analytic_bytes"] > 1.5:
        out.append(
            f"XLA moves {row['xla_over_analytic_bytes']:.1f}x the compulsory bytes "
            "(unfused intermediates, copies)"
        )
    bound, mfu, mbu = row["roofline_xla_bound"], row["roofline_xla_mfu"], row["roofline_xla_mbu"]
    if row["predicted_over_measured"] > 1.0:
        out.append("faster than the DRAM roof: the working set stays in CPU caches")
    elif bound == "compute" and mfu < 0.5:
        out.append(
            f"compute-bound at {mfu:.0%} of the matmul peak (small matmuls, "
            "softmax and norms off the matmul units)"
        )
    elif bound == "memory" and mbu < 0.5:
        out.append(f"memory-bound at {mbu:.0%} of the read bandwidth")
    return "; ".join(out) or "within noise of the roof"


def measure(preset: str, dtype: str | None, quick: bool) -> list[experiment.Row]:
    """One CSV row per phase: its ``PhaseResult.flat()``, its ``gaps`` and their ``reasons``."""
    config = experiment.model_config(preset, dtype)
    seq = 64 if quick else min(1024 if experiment.accelerator() else 256, config.max_len)
    points = [
        ("train", 2 if quick else 8, seq),
        ("prefill", 1, seq),
        ("decode", 1, seq),
        ("decode", 16 if quick else 64, seq),
    ]
    dispatch = dispatch_seconds()
    rows = []
    for phase, batch, length in points:
        result = analyze_phase(
            config, phase, batch, length, measure=True, quick=quick, preset=preset
        )
        gap = gaps(result, dispatch)
        row = {**result.flat(), **gap}
        rows.append({**row, "reasons": reasons(row)})
        print(
            f"{phase:<8} B={batch:<3} predicted/measured {gap['predicted_over_measured']:.2f} "
            f"analytic/XLA FLOPs {gap['analytic_over_xla_flops']:.3f}",
            flush=True,
        )
    return rows


def plot(rows: list[experiment.Row], path) -> None:
    plt = experiment.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['phase']}\nB={r['batch']}" for r in rows]
    xs = np.arange(len(rows))
    ax1.bar(xs, [r["predicted_over_measured"] for r in rows], color="C0")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks(xs, labels, fontsize=8)
    ax1.set(
        yscale="log",
        ylabel="XLA-predicted time / measured time (ratio)",
        title="How close XLA's roofline prediction is to the clock",
    )
    ax2.bar(
        xs - 0.2, [r["analytic_over_xla_flops"] for r in rows], 0.4, label="analytic / XLA FLOPs"
    )
    ax2.bar(
        xs + 0.2,
        [r["raw_over_corrected_flops"] for r in rows],
        0.4,
        label="XLA raw / loop-corrected FLOPs",
    )
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(xs, labels, fontsize=8)
    ax2.set(ylabel="ratio", title="FLOP counts: closed form, XLA raw and corrected")
    ax2.legend(fontsize=8)
    experiment.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("estimates", __doc__, argv)
    rows = measure(args.preset, args.dtype, args.quick)
    experiment.write_csv(args.out / "data.csv", rows)
    plot(rows, args.out / "estimates.png")
    lines = [
        f"Dispatch of an empty compiled call: {1e6 * rows[0]['dispatch_seconds']:.0f} µs.",
        "",
        "| phase | B | measured | XLA-predicted | predicted / measured | analytic / XLA FLOPs | "
        "raw / corrected FLOPs | XLA / analytic bytes | why they differ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['batch']} | {1e3 * r['measured_seconds_median']:.2f} ms | "
            f"{1e3 * r['roofline_xla_predicted_seconds']:.2f} ms | "
            f"{r['predicted_over_measured']:.2f} | {r['analytic_over_xla_flops']:.3f} | "
            f"{r['raw_over_corrected_flops']:.2f} | {r['xla_over_analytic_bytes']:.2f} | "
            f"{r['reasons']} |"
        )
    lines += ["", "![estimates](estimates.png)"]
    experiment.write_summary(
        args.out / "summary.md", f"Estimate against clock — {args.preset}", lines
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
