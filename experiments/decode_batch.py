"""Decode batch sweep: where does batching stop being free?

    python experiments/decode_batch.py [--preset small] [--seq 32] [--quick]

A decode step reads every weight and the KV cache to produce one token per sequence: at small B it
is memory-bound and a larger batch rides on bytes already paid for, so tokens/s grows almost
linearly with B. Once the step's arithmetic intensity (FLOPs per byte) passes the device's ridge
point it turns compute-bound and tokens/s flattens. This sweep measures decode tokens/s and
per-token latency against B, finds the measured knee, and compares it with the batch size the
roofline predicts from the analytic intensity and the calibrated peaks. The default context is short
(32 tokens) so that the weights, not the per-sequence KV cache, dominate the bytes — the regime where
batching pays; with a long context the cache grows with B and the intensity saturates below the ridge.
"""

from __future__ import annotations

import itertools
import sys

from jaxllm import experiment
from jaxllm.measure import PhaseResult, analyze_phase


def sweep(
    preset: str, dtype: str | None, seq: int, batches: list[int], quick: bool
) -> list[PhaseResult]:
    config = experiment.model_config(preset, dtype)
    results = []
    for batch in batches:
        result = analyze_phase(
            config, "decode", batch, seq, measure=True, quick=quick, preset=preset
        )
        print(
            f"decode B={batch:<4} {1e3 * result.seconds:8.2f} ms/step "
            f"{result.tokens_per_s:9.1f} tok/s  intensity {result.roofline.analytic.intensity:.2f}",
            flush=True,
        )
        results.append(result)
    return results


def predicted_knee(batches: list[int], intensity: list[float], ridge: float) -> float | None:
    """Batch at which the analytic intensity (FLOP/byte, one per batch) reaches the ridge,
    interpolated linearly in B between the two sweep points around the crossing; None if the sweep
    never reaches the ridge.

    Intensity rises with B (FLOPs grow with B, weight bytes do not) but saturates at FLOPs per
    sequence / KV-cache bytes per sequence, which can lie below the ridge for a long context.
    """
    points = zip(batches, intensity, strict=True)
    for (b0, i0), (b1, i1) in itertools.pairwise(points):
        if i0 < ridge <= i1:
            return b0 + (ridge - i0) * (b1 - b0) / (i1 - i0)
    return None


def measured_knee(batches: list[int], seconds: list[float]) -> float:
    """Where the measured step time (seconds, one per batch) turns from flat to linear in B.

    Fits the roofline's shape t(B) = max(t_1, B · c) to the two ends of the sweep: t_1 the step time
    at B=1 (memory-bound: the weights are read once whatever B is), c the time per sequence at the
    largest B (compute-bound). The knee is where the two lines meet, B = t_1 / c; robust to the noise
    of single points in between.
    """
    per_sequence = seconds[-1] / batches[-1]
    return seconds[0] / batches[0] / per_sequence


def plot(results: list[PhaseResult], knee_pred: float | None, knee_meas: float, path) -> None:
    plt = experiment.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = [r.batch for r in results]
    ax1.plot(batches, [r.tokens_per_s for r in results], "o-", label="measured")
    first = results[0]
    ideal = [first.tokens_per_s * b / first.batch for b in batches]
    ax1.plot(batches, ideal, ":", color="gray", label="linear in B (free batching)")
    roof = [r.batch / r.roofline.analytic.predicted_seconds for r in results]
    ax1.plot(batches, roof, "--", label="roofline bound (analytic)")
    if knee_pred is not None:
        ax1.axvline(knee_pred, color="C3", alpha=0.6, label=f"predicted knee B≈{knee_pred:.0f}")
    ax1.axvline(knee_meas, color="C2", alpha=0.6, label=f"measured knee B≈{knee_meas:.0f}")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="batch B (sequences)",
        ylabel="decode throughput (tokens/s)",
        title="Decode tokens/s against batch",
    )
    ax1.legend(fontsize=8)
    ax2.plot(batches, [1e3 * r.seconds for r in results], "o-")
    ax2.set(
        xscale="log",
        xlabel="batch B (sequences)",
        ylabel="per-token latency (ms per step)",
        title="Decode latency against batch",
    )
    experiment.save_figure(fig, path)


def saturation(results: list[PhaseResult]) -> float:
    """The analytic intensity as B grows without bound, FLOP/byte: a step's FLOPs and bytes are
    each linear in B (the weights read once whatever B), so it is FLOPs per sequence over bytes per
    sequence (KV cache, tokens, logits), the quotient of their growth between the sweep's ends."""
    a, z = results[0].roofline.analytic, results[-1].roofline.analytic
    return (z.flops - a.flops) / (z.bytes - a.bytes)


def summary(results: list[PhaseResult], knee_pred: float | None, knee_meas: float) -> list[str]:
    """The two ends of the sweep, the ridge and the two knees, in words."""
    first, last = results[0], results[-1]
    a, z = first.roofline.analytic, last.roofline.analytic
    limit = saturation(results)
    beyond = (
        "so this context stays memory-bound at any batch."
        if limit < a.ridge
        else f"above the ridge: a batch past B={last.batch} would turn the step compute-bound."
    )
    crossing = (
        f"the analytic intensity crosses it at B≈{knee_pred:.1f} (predicted knee)."
        if knee_pred is not None
        else f"the analytic intensity never reaches it in this sweep: it tends to {limit:.2f} "
        f"FLOP/byte as B grows (FLOPs per sequence over bytes per sequence), {beyond}"
    )
    versus = f"; {knee_meas / knee_pred:.2f}x the predicted knee." if knee_pred is not None else "."
    return [
        f"- B=1: {1e3 * first.seconds:.2f} ms per step, {first.tokens_per_s:.1f} tokens/s, "
        f"intensity {a.intensity:.2f} FLOP/byte ({a.bound}-bound), MBU {a.mbu:.0%}.",
        f"- B={last.batch}: {1e3 * last.seconds:.2f} ms per step, {last.tokens_per_s:.1f} tokens/s "
        f"({last.tokens_per_s / first.tokens_per_s:.1f}x B=1), intensity {z.intensity:.2f} "
        f"FLOP/byte ({z.bound}-bound).",
        f"- Ridge point of this device (calibrated): {a.ridge:.2f} FLOP/byte; {crossing}",
        f"- Measured knee: B≈{knee_meas:.1f}, where the flat B=1 step time meets the linear growth "
        f"of the B={last.batch} step (t = max(t_1, B·t_{last.batch}/{last.batch})){versus}",
        "- The optimal batch size in the sense of the source article — compute and transfer "
        "finishing together — is the ridge crossing; past the measured knee, more batch buys "
        "latency, not throughput.",
        "",
        "![decode batch sweep](decode_batch.png)",
    ]


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("decode_batch", __doc__, argv, extra=_extra)
    # Past the knee: the ridge is ~10x higher on a GPU.
    top = 1024 if experiment.accelerator() else 128
    batches = [1, 2, 4, 8] if args.quick else [2**i for i in range(top.bit_length())]
    seq = args.seq or (64 if args.quick else 32)
    results = sweep(args.preset, args.dtype, seq, batches, args.quick)
    experiment.write_csv(args.out / "data.csv", [r.flat() for r in results])
    intensity = [r.roofline.analytic.intensity for r in results]
    knee_pred = predicted_knee(batches, intensity, results[0].roofline.analytic.ridge)
    knee_meas = measured_knee(batches, [r.seconds for r in results])
    plot(results, knee_pred, knee_meas, args.out / "decode_batch.png")
    experiment.write_summary(
        args.out / "summary.md",
        f"Decode batch sweep — {args.preset}, {seq} tokens in the cache",
        summary(results, knee_pred, knee_meas),
    )
    return 0


def _extra(parser) -> None:
    parser.add_argument("--seq", type=int, default=None, help="tokens in the cache (context)")


if __name__ == "__main__":
    sys.exit(main())
