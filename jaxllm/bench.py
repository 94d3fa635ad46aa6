"""Each phase three ways — analytic, XLA, wall clock — on the device's roofline.

``analyze_phase`` gives one phase at one shape as a JSON-ready dict with the sections ``analytic``,
``xla``, ``measured`` (only when measured) and ``roofline``; ``bench`` runs the standard grid (train,
prefill, and decode at B in {1, 8, 32, 128}) for some presets and yields one such dict per row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax

from jaxllm import hardware, memory, phases
from jaxllm.config import ModelConfig, get_preset
from jaxllm.cost import analyze_compiled, compile_timed
from jaxllm.errors import InputError
from jaxllm.roofline import roofline
from jaxllm.timing import time_compiled

DECODE_BATCHES = (1, 8, 32, 128)


def available_bytes() -> int:
    """Memory a program may still use: ``jaxllm.memory.available_bytes`` (device memory on an
    accelerator; on a CPU the least of MemAvailable, the cgroup limit and ``ulimit -v``)."""
    return memory.available_bytes()


def _measure(
    program: phases.Program, compiled: Any, footprint: int, repeats: int
) -> dict[str, Any]:
    """Times ``compiled`` (the executable XLA's figures describe) on fresh arguments."""
    free = available_bytes()
    if footprint > free:
        raise InputError(
            f"--measure needs {footprint / 1e9:.2f} GB for {program.phase} (XLA footprint) but the "
            f"device has {free / 1e9:.2f} GB available; analyse it without --measure"
        )
    make_args = program.make_args(jax.random.key(0))
    timing = time_compiled(compiled, make_args, repeats=repeats, warmup=1)
    out = timing.to_dict()
    out["tokens_per_s"] = program.tokens / timing.seconds_median
    return out


def _roofline(analytic: dict, xla: dict, peaks: dict, seconds: float | None) -> dict[str, Any]:
    """The verdict from the analytic counts, and the same from XLA's counts."""
    flops, bw = peaks["flops_per_s"], peaks["bandwidth_bytes_per_s"]
    out = roofline(analytic["flops"], analytic["bytes"], flops, bw, seconds).to_dict()
    out["xla"] = roofline(xla["flops"], xla["bytes_accessed"], flops, bw, seconds).to_dict()
    out["peaks"] = peaks
    return out


def analyze_phase(
    config: ModelConfig,
    phase: str,
    batch: int,
    seq: int,
    measure: bool = False,
    quick: bool = False,
    preset: str | None = None,
) -> dict[str, Any]:
    """One phase at one shape, three ways. ``quick``: quick calibration and fewer timed repeats."""
    program = phases.build(config, phase, batch, seq)
    analytic = phases.analytic_view(program)
    compiled, compile_seconds = compile_timed(program.jitted, *program.abstract_args)
    xla = analyze_compiled(compiled, compile_seconds).to_dict()
    repeats = 3 if quick else 5
    measured = _measure(program, compiled, xla["footprint_bytes"], repeats) if measure else None
    calibration = hardware.calibrate(quick=quick)
    peaks = hardware.roofline_peaks(calibration, config.dtype)
    seconds = measured["seconds_median"] if measured else None
    roof = _roofline(analytic, xla, peaks, seconds)
    if (
        calibration["platform"] != "cpu"
    ):  # an accelerator: the calibrated roofline beside the sheet's
        calibrated = hardware.roofline_peaks(calibration, config.dtype, data_sheet=False)
        roof["calibrated"] = _roofline(analytic, xla, calibrated, seconds)
    out: dict[str, Any] = {
        "preset": preset,
        "phase": phase,
        "batch": batch,
        "seq": seq,
        "device": calibration["device_kind"],
        "analytic": analytic,
        "xla": xla,
        "roofline": roof,
    }
    if measured is not None:
        out["measured"] = measured
    return out


def grid(preset: str, batches: Sequence[int], quick: bool) -> list[tuple[str, int, int]]:
    """(phase, batch, seq) rows of the bench for one preset: shapes that run in seconds on a CPU in
    quick mode, the documented shapes otherwise."""
    config = get_preset(preset)
    seq = min(config.max_len, 64 if quick else 256)
    context = min(config.max_len, 128 if quick else 1024)
    rows = [("train", 1 if quick else 4, seq), ("prefill", 1, context)]
    return rows + [("decode", b, context) for b in batches]


def bench(
    presets: Sequence[str], batches: Sequence[int] = DECODE_BATCHES, quick: bool = False
) -> Iterator[dict[str, Any]]:
    """Measures every row of ``grid`` for each preset; yields ``analyze_phase`` dicts."""
    for preset in presets:
        config = get_preset(preset)
        for phase, batch, seq in grid(preset, batches, quick):
            yield analyze_phase(config, phase, batch, seq, measure=True, quick=quick, preset=preset)


def si(value: float | None, unit: str = "") -> str:
    """A number with an SI prefix: 1.23e9, "FLOP/s" -> '1.23 GFLOP/s'; None -> '-'."""
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def table_row(row: dict[str, Any]) -> str:
    """One line: shape, FLOPs analytic | XLA, measured time | predicted, throughput, MFU, MBU."""
    roof, meas = row["roofline"], row.get("measured") or {}
    util = roof["mfu"] if roof["bound"] == "compute" else roof["mbu"]
    kind = "MFU" if roof["bound"] == "compute" else "MBU"
    return (
        f"{row['preset'] or '-':<8} {row['phase']:<8} B={row['batch']:<4} S={row['seq']:<5} "
        f"flops {si(row['analytic']['flops'], 'F'):>9} | {si(row['xla']['flops'], 'F'):>9}  "
        f"time {si(meas.get('seconds_median'), 's'):>9} | {si(roof['predicted_seconds'], 's'):>9}"
        f"  {si(meas.get('tokens_per_s'), 'tok/s'):>12}  {roof['bound']:<7} "
        f"{kind} {'-' if util is None else f'{util:.1%}'}"
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


def analysis_table(row: dict[str, Any]) -> list[str]:
    """``jaxllm analyze``'s table: analytic | XLA | measured side by side, then the verdict."""
    a, x, roof = row["analytic"], row["xla"], row["roofline"]
    meas = row.get("measured") or {}
    seconds = meas.get("seconds_median")
    corrected = (
        "loop-corrected" if x["loop_corrected"] else "NOT loop-corrected (unknown trip count)"
    )
    lines = [
        f"{row['preset'] or '-'} {row['phase']} B={row['batch']} S={row['seq']} "
        f"(cache {a['capacity']} slots) on {row['device']}",
        f"{'':<22}{'analytic':>14}{'XLA':>14}{'measured':>14}",
        f"{'FLOPs':<22}{si(a['flops'], 'F'):>14}{si(x['flops'], 'F'):>14}{'':>14}",
        f"{'  causal FLOPs':<22}{si(a['flops_causal'], 'F'):>14}{'':>14}{'':>14}",
        f"{'bytes moved':<22}{si(a['bytes'], 'B'):>14}{si(x['bytes_accessed'], 'B'):>14}",
        f"{'memory':<22}{si(a['memory']['total'], 'B'):>14}{si(x['footprint_bytes'], 'B'):>14}",
        f"{'seconds':<22}{si(roof['predicted_seconds'], 's'):>14}"
        f"{si(roof['xla']['predicted_seconds'], 's'):>14}{si(seconds, 's'):>14}",
        f"XLA: {corrected}; alias {si(x['alias_bytes'], 'B')}, temp {si(x['temp_bytes'], 'B')},"
        f" compiled in {x['compile_seconds']:.2f} s",
        f"roofline ({roof['peaks']['source']}): intensity {roof['intensity']:.3g} FLOP/B, ridge "
        f"{roof['ridge']:.3g} -> {roof['bound']}-bound",
    ]
    if seconds is not None:
        lines.append(
            f"measured: {si(meas['tokens_per_s'], 'tok/s')}, MFU {roof['mfu']:.1%}, "
            f"MBU {roof['mbu']:.1%}, efficiency (predicted/measured) {roof['efficiency']:.1%}"
        )
    return lines
