"""How measurements are shown to people: numbers with SI prefixes, ``jaxllm analyze``'s table,
``jaxllm bench``'s rows and the calibration lines that head the bench, ``calibrate`` and the report."""

from __future__ import annotations

from typing import Any

from jaxllm import hardware
from jaxllm.measure import PhaseResult


def si(value: float | None, unit: str = "") -> str:
    """A number with an SI prefix: 1.23e9, "FLOP/s" -> '1.23 GFLOP/s'; None -> '-'."""
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table_row(row: PhaseResult) -> str:
    """One line: shape, FLOPs analytic | XLA, measured time | predicted, throughput, MFU or MBU."""
    roof = row.roofline.analytic
    compute = roof.bound == "compute"
    timed = row.timing is not None
    return (
        f"{row.preset or '-':<8} {row.phase:<8} B={row.batch:<4} S={row.seq:<5} "
        f"flops {si(row.analytic.flops, 'F'):>9} | {si(row.xla.flops, 'F'):>9}  "
        f"time {si(row.seconds if timed else None, 's'):>9} | {si(roof.predicted_seconds, 's'):>9}"
        f"  {si(row.tokens_per_s if timed else None, 'tok/s'):>12}  {roof.bound:<7} "
        f"{'MFU' if compute else 'MBU'} {_percent(roof.mfu if compute else roof.mbu)}"
    )


def peaks_line(calibration: dict[str, Any]) -> str:
    """The calibrated peaks in one line: matmuls (TF32 on a GPU), read and copy bandwidth."""
    c = calibration
    tf32 = f"tf32 {si(c['tf32_flops_per_s'], 'FLOP/s')}, " if c.get("tf32_flops_per_s") else ""
    return (
        f"bf16->f32 matmul {si(c['bf16_flops_per_s'], 'FLOP/s')}, {tf32}"
        f"f32 matmul {si(c['f32_flops_per_s'], 'FLOP/s')}, "
        f"read {si(c['read_bytes_per_s'], 'B/s')} (memory roof), copy {si(c['copy_bytes_per_s'], 'B/s')}"
    )


def sheet_line(calibration: dict[str, Any]) -> str | None:
    """The data sheet's peaks of this device in one line (None for a CPU or an unknown device)."""
    sheet = hardware.published(calibration["device_kind"])
    if sheet is None or calibration["platform"] == "cpu":
        return None
    tf32 = f"tf32 {si(sheet.tf32_flops_per_s, 'FLOP/s')}, " if sheet.tf32_flops_per_s else ""
    f32 = f"f32 {si(sheet.f32_flops_per_s, 'FLOP/s')}, " if sheet.f32_flops_per_s else ""
    return (
        f"{sheet.name} data sheet: bf16 {si(sheet.bf16_flops_per_s, 'FLOP/s')}, {tf32}{f32}"
        f"memory {si(sheet.bandwidth_bytes_per_s, 'B/s')} ({sheet.source})"
    )


def header(calibration: dict[str, Any]) -> str:
    """The bench's first lines: the calibrated peaks of this device, when they were measured, the
    data sheet's beside them on an accelerator, anything suspect, and the columns of ``table_row``."""
    c = calibration
    lines = [f"# {c['device_kind']} calibrated {c['date']} (jax {c['jax']}): {peaks_line(c)}"]
    sheet = sheet_line(c)
    lines += [f"# {sheet}"] if sheet else []
    lines += [f"# SUSPECT calibration: {line}" for line in c.get("suspect", [])]
    lines.append(
        "# preset phase batch seq | FLOPs analytic | XLA | seconds measured | roofline-predicted"
        " | throughput | bound | MFU (compute-bound) or MBU (memory-bound)"
    )
    return "\n".join(lines)


def analysis_table(row: PhaseResult) -> list[str]:
    """``jaxllm analyze``'s table: analytic | XLA | measured side by side, then the verdict."""
    a, x, roof = row.analytic, row.xla, row.roofline.analytic
    corrected = "loop-corrected" if x.loop_corrected else "NOT loop-corrected (unknown trip count)"
    lines = [
        f"{row.preset or '-'} {row.phase} B={row.batch} S={row.seq} "
        f"(cache {a.capacity} slots) on {row.device}",
        f"{'':<22}{'analytic':>14}{'XLA':>14}{'measured':>14}",
        f"{'FLOPs':<22}{si(a.flops, 'F'):>14}{si(x.flops, 'F'):>14}{'':>14}",
        f"{'  causal FLOPs':<22}{si(a.flops_causal, 'F'):>14}{'':>14}{'':>14}",
        f"{'bytes moved':<22}{si(a.bytes, 'B'):>14}{si(x.bytes_accessed, 'B'):>14}",
        f"{'memory':<22}{si(a.memory['total'], 'B'):>14}{si(x.footprint_bytes, 'B'):>14}",
        f"{'seconds':<22}{si(roof.predicted_seconds, 's'):>14}"
        f"{si(row.roofline.xla.predicted_seconds, 's'):>14}{si(roof.measured_seconds, 's'):>14}",
        f"XLA: {corrected}; alias {si(x.alias_bytes, 'B')}, temp {si(x.temp_bytes, 'B')},"
        f" compiled in {x.compile_seconds:.2f} s"
        + "".join(f", {k}={v!r}" for k, v in row.compile_options.items()),
        f"roofline ({row.roofline.peaks.source}): intensity {roof.intensity:.3g} FLOP/B, ridge "
        f"{roof.ridge:.3g} -> {roof.bound}-bound",
    ]
    if row.timing is not None:
        lines.append(
            f"measured: {si(row.tokens_per_s, 'tok/s')}, MFU {_percent(roof.mfu)}, "
            f"MBU {_percent(roof.mbu)}, efficiency (predicted/measured) {_percent(roof.efficiency)}"
        )
    return lines
