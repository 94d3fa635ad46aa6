"""Every phase on the device's roofline: XLA's prediction against the clock.

    python experiments/roofline.py [--preset small] [--quick]

Each point is one compiled phase at one shape — the train step, prefill at several prompt lengths T,
decode at several batch sizes B and cache lengths S — placed at its arithmetic intensity (XLA's
loop-corrected FLOPs over XLA's bytes accessed). The XLA-predicted point sits on the roof,
min(peak, bandwidth × intensity); the measured point is XLA's FLOPs over the measured median time.
The ceilings are the calibrated matmul peak and copy bandwidth of this device (and, on a known
accelerator, its published peaks).
"""

from __future__ import annotations

import sys

from jaxllm import experiment, hardware
from jaxllm.measure import PhaseResult, analyze_phase
from jaxllm.tables import peaks_line, si


def shapes(quick: bool, max_len: int) -> list[tuple[str, int, int]]:
    """(phase, B, T or S) points: a train step, prefill over T, decode over B and S."""
    if quick:
        return [
            ("train", 2, 32),
            ("prefill", 1, 32),
            ("prefill", 1, 64),
            ("decode", 1, 64),
            ("decode", 16, 64),
        ]
    top = 1024 if experiment.accelerator() else 256
    lengths = [s for s in (64, 128, 256, 512, 1024) if s <= min(top, max_len)]
    return (
        [("train", 8, lengths[-1])]
        + [("prefill", 1, t) for t in lengths]
        + [("prefill", 8, lengths[-1])]
        + [("decode", b, s) for b in (1, 8, 64) for s in (lengths[0], lengths[-1])]
    )


def measure(preset: str, dtype: str | None, quick: bool) -> list[PhaseResult]:
    config = experiment.model_config(preset, dtype)
    results = []
    for phase, batch, seq in shapes(quick, config.max_len):
        result = analyze_phase(config, phase, batch, seq, measure=True, quick=quick, preset=preset)
        roof = result.roofline.xla
        print(
            f"{phase:<8} B={batch:<3} T/S={seq:<5} I={roof.intensity:7.2f} FLOP/B "
            f"measured {si(roof.achieved_flops_per_s, 'FLOP/s')} ({roof.efficiency:.0%} of the roof)",
            flush=True,
        )
        results.append(result)
    return results


def plot(results: list[PhaseResult], calibration: dict, path) -> None:
    import numpy as np

    plt = experiment.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = np.logspace(-1, 4, 200)
    bw = calibration["read_bytes_per_s"]
    for key, label, style in (("f32_flops_per_s", "f32", "-"), ("bf16_flops_per_s", "bf16", "--")):
        ax.plot(
            xs,
            np.minimum(calibration[key], bw * xs),
            style,
            color="k",
            alpha=0.6,
            label=f"calibrated {label} roof",
        )
    sheet = hardware.published(calibration["device_kind"])
    if sheet is not None and calibration["platform"] != "cpu":
        ax.plot(
            xs,
            np.minimum(sheet.bf16_flops_per_s, sheet.bandwidth_bytes_per_s * xs),
            ":",
            color="C3",
            label=f"published {sheet.name} bf16 roof",
        )
    colors = {"train": "C0", "prefill": "C1", "decode": "C2"}
    for phase, color in colors.items():
        roofs = [r.roofline.xla for r in results if r.phase == phase]
        ax.scatter(
            [r.intensity for r in roofs],
            [r.roof_flops_per_s for r in roofs],
            marker="o",
            facecolors="none",
            edgecolors=color,
            s=50,
            label=f"{phase}: XLA-predicted",
        )
        ax.scatter(
            [r.intensity for r in roofs],
            [r.achieved_flops_per_s for r in roofs],
            marker="x",
            color=color,
            s=50,
            label=f"{phase}: measured",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (FLOP/byte, XLA counts)",
        ylabel="throughput (FLOP/s)",
        title="Training, prefill and decode on the roofline",
    )
    ax.legend(fontsize=7, loc="lower right")
    experiment.save_figure(fig, path)


def above_roof(results: list[PhaseResult]) -> list[str]:
    """The points measured faster than their roof ("prefill B=1 T=256 115%"): no sound calibration
    has any (the roofs are what nothing on the device beats)."""
    return [
        f"{r.phase} B={r.batch} T/S={r.seq} {r.roofline.xla.efficiency:.0%}"
        for r in results
        if (r.roofline.xla.efficiency or 0) > 1
    ]


def summary(
    results: list[PhaseResult], calibration: dict, preset: str, dtype: str, redone: list[str]
) -> list[str]:
    """The calibrated peaks, then one table row per point: intensity, bound, predicted and measured
    time (XLA's counts on the roofline). ``redone``: the points above their roof under a first
    calibration, which was then taken again."""
    lines = [
        f"Calibrated peaks: {peaks_line(calibration)}; "
        f"ridge {results[0].roofline.xla.ridge:.1f} FLOP/byte ({preset} computes in {dtype}).",
        "",
    ]
    if redone:
        lines += [
            f"A first calibration put {len(redone)} points above their roof "
            f"({', '.join(redone)}): the device was calibrated and measured again.",
            "",
        ]
    if beaten := above_roof(results):
        lines += [f"**Above the roof, so the calibration is suspect:** {', '.join(beaten)}.", ""]
    lines += [
        "| phase | B | T or S | intensity (FLOP/B) | bound | predicted | measured | measured / roof |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        roof = r.roofline.xla
        lines.append(
            f"| {r.phase} | {r.batch} | {r.seq} | {roof.intensity:.2f} | {roof.bound} | "
            f"{1e3 * roof.predicted_seconds:.2f} ms | {1e3 * r.seconds:.2f} ms | "
            f"{roof.efficiency:.0%} |"
        )
    return [*lines, "", "![roofline](roofline.png)"]


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("roofline", __doc__, argv)
    results = measure(args.preset, args.dtype, args.quick)
    redone = above_roof(results)
    if redone:  # the cached calibration was taken in a slow moment (a busy shared machine)
        print(f"above the roof: {', '.join(redone)}; calibrating and measuring again", flush=True)
        hardware.calibrate(refresh=True, quick=args.quick)
        results = measure(args.preset, args.dtype, args.quick)
    calibration = hardware.calibrate(quick=args.quick)
    experiment.write_csv(args.out / "data.csv", [r.flat() for r in results])
    experiment.write_json(args.out / "calibration.json", calibration)
    plot(results, calibration, args.out / "roofline.png")
    dtype = experiment.model_config(args.preset, args.dtype).dtype
    lines = summary(results, calibration, args.preset, dtype, redone)
    experiment.write_summary(args.out / "summary.md", f"Roofline — {args.preset}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
