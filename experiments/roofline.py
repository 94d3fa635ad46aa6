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
from jaxllm.bench import analyze_phase, peaks_line, si


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


def measure(preset: str, dtype: str | None, quick: bool) -> list[experiment.Row]:
    config = experiment.model_config(preset, dtype)
    rows = []
    for phase, batch, seq in shapes(quick, config.max_len):
        out = analyze_phase(config, phase, batch, seq, measure=True, quick=quick, preset=preset)
        xla, roof = out["xla"], out["roofline"]["xla"]
        seconds = out["measured"]["seconds_median"]
        rows.append(
            {
                "phase": phase,
                "batch": batch,
                "seq": seq,
                "xla_flops": xla["flops"],
                "xla_bytes": xla["bytes_accessed"],
                "intensity": roof["intensity"],
                "ridge": roof["ridge"],
                "bound": roof["bound"],
                "predicted_seconds": roof["predicted_seconds"],
                "measured_seconds": seconds,
                "predicted_flops_per_s": xla["flops"] / roof["predicted_seconds"],
                "measured_flops_per_s": xla["flops"] / seconds,
                "efficiency": roof["predicted_seconds"] / seconds,
            }
        )
        print(
            f"{phase:<8} B={batch:<3} T/S={seq:<5} I={roof['intensity']:7.2f} FLOP/B "
            f"measured {si(xla['flops'] / seconds, 'FLOP/s')} "
            f"({roof['predicted_seconds'] / seconds:.0%} of the roof)",
            flush=True,
        )
    return rows


def plot(rows: list[experiment.Row], calibration: dict, path) -> None:
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
        pts = [r for r in rows if r["phase"] == phase]
        ax.scatter(
            [r["intensity"] for r in pts],
            [r["predicted_flops_per_s"] for r in pts],
            marker="o",
            facecolors="none",
            edgecolors=color,
            s=50,
            label=f"{phase}: XLA-predicted",
        )
        ax.scatter(
            [r["intensity"] for r in pts],
            [r["measured_flops_per_s"] for r in pts],
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


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("roofline", __doc__, argv)
    rows = measure(args.preset, args.dtype, args.quick)
    calibration = hardware.calibrate(quick=args.quick)
    experiment.write_csv(args.out / "data.csv", rows)
    experiment.write_json(args.out / "calibration.json", calibration)
    plot(rows, calibration, args.out / "roofline.png")
    lines = [
        f"Calibrated peaks: {peaks_line(calibration)}; "
        f"ridge {rows[0]['ridge']:.1f} FLOP/byte ({args.preset} computes in "
        f"{experiment.model_config(args.preset, args.dtype).dtype}).",
        "",
        "| phase | B | T or S | intensity (FLOP/B) | bound | predicted | measured | measured / roof |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['batch']} | {r['seq']} | {r['intensity']:.2f} | {r['bound']} | "
            f"{1e3 * r['predicted_seconds']:.2f} ms | {1e3 * r['measured_seconds']:.2f} ms | "
            f"{r['efficiency']:.0%} |"
        )
    lines += ["", "![roofline](roofline.png)"]
    experiment.write_summary(args.out / "summary.md", f"Roofline — {args.preset}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
