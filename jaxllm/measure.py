"""One phase at one shape three ways — the closed-form count, XLA's cost of the compiled program and
the wall clock — with the roofline verdict from each count, as one typed record.

``analyze_phase(config, phase, batch, seq, measure=...)`` returns a ``PhaseResult``:
``result.xla.flops``, ``result.roofline.xla.predicted_seconds``, ``result.timing.seconds_median``.
``result.to_json()`` is the object ``jaxllm analyze --json`` prints (its fields are in the README);
``result.flat()`` is that object on one level, nested keys joined by ``_``
(``roofline_xla_predicted_seconds``): one row of a CSV.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxllm import hardware, memory, phases, xla_options
from jaxllm.analytic import AnalyticView
from jaxllm.config import ModelConfig
from jaxllm.cost import XlaCost, analyze_compiled, compile_timed
from jaxllm.errors import InputError
from jaxllm.hardware import Peaks
from jaxllm.roofline import Roofline, roofline
from jaxllm.timing import Timing, time_compiled


@dataclasses.dataclass(frozen=True)
class Rooflines:
    """The roofline verdict on one set of peaks, from the analytic counts and from XLA's."""

    analytic: Roofline
    xla: Roofline
    peaks: Peaks

    def to_json(self) -> dict[str, Any]:
        """The analytic verdict's fields, with ``xla`` and ``peaks`` inside."""
        return {**self.analytic.to_dict(), "xla": self.xla.to_dict(), "peaks": self.peaks.to_dict()}


def rooflines(
    analytic: AnalyticView, xla: XlaCost, peaks: Peaks, seconds: float | None
) -> Rooflines:
    """Both verdicts on ``peaks``; ``seconds``: the measured time per call, if any."""

    def verdict(flops: float, nbytes: float) -> Roofline:
        return roofline(flops, nbytes, peaks.flops_per_s, peaks.bandwidth_bytes_per_s, seconds)

    return Rooflines(
        verdict(analytic.flops, analytic.bytes), verdict(xla.flops, xla.bytes_accessed), peaks
    )


@dataclasses.dataclass(frozen=True)
class PhaseResult:
    """One phase at one shape (B = ``batch``, T = ``seq``; decode: the context the step completes)."""

    preset: str | None  # the preset name, or the Hugging Face directory
    phase: str  # train, prefill or decode
    batch: int
    seq: int
    device: str  # the device kind
    analytic: AnalyticView
    xla: XlaCost
    timing: Timing | None  # the wall clock; None unless measured
    roofline: Rooflines  # on the data sheet's peaks on a known accelerator, else the calibrated
    calibrated: Rooflines | None = None  # on an accelerator: the same on the calibrated peaks
    compile_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # jaxllm.xla_options

    @property
    def seconds(self) -> float:
        """Median measured seconds per call; ValueError if the phase was not timed."""
        if self.timing is None:
            raise ValueError(f"{self.phase} at B={self.batch} T={self.seq} was not measured")
        return self.timing.seconds_median

    @property
    def tokens_per_s(self) -> float:
        """Tokens processed per measured second; ValueError if the phase was not timed."""
        return self.analytic.tokens / self.seconds

    def to_json(self) -> dict[str, Any]:
        """The ``jaxllm analyze --json`` object: ``measured`` only when timed, ``roofline.calibrated``
        only on an accelerator."""
        roof = self.roofline.to_json()
        if self.calibrated is not None:
            roof["calibrated"] = self.calibrated.to_json()
        out: dict[str, Any] = {
            "preset": self.preset,
            "phase": self.phase,
            "batch": self.batch,
            "seq": self.seq,
            "device": self.device,
            "analytic": self.analytic.to_dict(),
            "xla": {**self.xla.to_dict(), "compile_options": self.compile_options},
            "roofline": roof,
        }
        if self.timing is not None:
            out["measured"] = {**self.timing.to_dict(), "tokens_per_s": self.tokens_per_s}
        return out

    def flat(self) -> dict[str, Any]:
        """``to_json()`` on one level: {"xla": {"flops": 1}} -> {"xla_flops": 1}."""
        return flatten(self.to_json())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict, each key the path to its value joined by ``_``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}_")
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One phase at one shape, compiled: its program, the executable and XLA's figures of it."""

    program: phases.Program
    executable: Any
    xla: XlaCost


def compile_phase(config: ModelConfig, phase: str, batch: int, seq: int) -> Compiled:
    """``phase`` at tokens [batch, seq] built and compiled (nothing allocated)."""
    program = phases.build(config, phase, batch, seq)
    executable, compile_seconds = compile_timed(program.jitted, *program.abstract_args)
    return Compiled(program, executable, analyze_compiled(executable, compile_seconds))


def check_fits(compiled: Compiled, advice: str) -> None:
    """InputError when timing ``compiled`` needs more memory (its XLA footprint) than this process
    may use; ``advice``: what to change, in the words of the command that asked."""
    p, need, free = compiled.program, compiled.xla.footprint_bytes, memory.available_bytes()
    if need > free:
        raise InputError(
            f"measuring {p.phase} at B={p.batch} T={p.seq} needs {need / 1e9:.2f} GB (XLA "
            f"footprint) but the device has {free / 1e9:.2f} GB available; {advice}"
        )


def analyze_phase(
    config: ModelConfig,
    phase: str,
    batch: int,
    seq: int,
    measure: bool = False,
    quick: bool = False,
    preset: str | None = None,
) -> PhaseResult:
    """One phase at one shape, three ways. ``quick``: quick calibration and fewer timed repeats."""
    compiled = compile_phase(config, phase, batch, seq)
    if measure:
        check_fits(compiled, "analyse it without --measure")
    return phase_result(compiled, measure, quick, preset)


def phase_result(
    compiled: Compiled, measure: bool, quick: bool, preset: str | None = None
) -> PhaseResult:
    """``analyze_phase``'s record of a compiled phase, timed when ``measure`` (``check_fits``
    first)."""
    program, xla = compiled.program, compiled.xla
    analytic = phases.analytic_view(program)
    timing = None
    if measure:
        make_args = program.make_args(jax.random.key(0))
        timing = time_compiled(compiled.executable, make_args, repeats=3 if quick else 5, warmup=1)
    seconds = None if timing is None else timing.seconds_median
    calibration = hardware.calibrate(quick=quick)

    def on(data_sheet: bool) -> Rooflines:
        peaks = hardware.roofline_peaks(calibration, program.config.dtype, data_sheet)
        return rooflines(analytic, xla, peaks, seconds)

    accelerator = calibration["platform"] != "cpu"  # its calibrated roofline beside the sheet's
    return PhaseResult(
        preset,
        program.phase,
        program.batch,
        program.seq,
        calibration["device_kind"],
        analytic,
        xla,
        timing,
        roofline=on(data_sheet=True),
        calibrated=on(data_sheet=False) if accelerator else None,
        compile_options=xla_options.phase_options(program.phase, program.config),
    )
