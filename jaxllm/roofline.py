"""The roofline: a phase's FLOPs and bytes against a device's peak FLOP/s and bandwidth.

A program of F FLOPs that must move Q bytes takes at least max(F / peak, Q / bandwidth) seconds.
Its arithmetic intensity F / Q (FLOP per byte) against the ridge point peak / bandwidth says which
limit binds: above the ridge it is compute-bound, below it memory-bound. Efficiency = predicted /
measured time; MFU = achieved FLOP/s / peak, MBU = achieved bytes/s / bandwidth.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Roofline:
    flops: float
    bytes: float
    peak_flops_per_s: float
    bandwidth_bytes_per_s: float
    intensity: float  # FLOP per byte
    ridge: float  # FLOP per byte where the two limits meet
    bound: str  # "compute" or "memory"
    predicted_seconds: float
    measured_seconds: float | None = None
    efficiency: float | None = None  # predicted / measured
    mfu: float | None = None  # (flops / measured) / peak
    mbu: float | None = None  # (bytes / measured) / bandwidth

    @property
    def roof_flops_per_s(self) -> float:
        """FLOP/s at the predicted time: the roof above this intensity, min(peak, bandwidth × I)."""
        return self.flops / self.predicted_seconds

    @property
    def achieved_flops_per_s(self) -> float | None:
        """FLOP/s at the measured time (None unmeasured)."""
        return None if self.measured_seconds is None else self.flops / self.measured_seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def roofline(
    flops: float,
    nbytes: float,
    peak_flops_per_s: float,
    bandwidth_bytes_per_s: float,
    measured_seconds: float | None = None,
) -> Roofline:
    """The roofline verdict for ``flops`` and ``nbytes`` on a device (and a measured time if any)."""
    if peak_flops_per_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError(
            f"peaks must be positive, got {peak_flops_per_s} FLOP/s, {bandwidth_bytes_per_s} B/s"
        )
    if flops < 0 or nbytes <= 0:
        raise ValueError(f"need flops >= 0 and bytes > 0, got {flops}, {nbytes}")
    compute, memory = flops / peak_flops_per_s, nbytes / bandwidth_bytes_per_s
    ridge = peak_flops_per_s / bandwidth_bytes_per_s
    out = Roofline(
        flops=flops,
        bytes=nbytes,
        peak_flops_per_s=peak_flops_per_s,
        bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        intensity=flops / nbytes,
        ridge=ridge,
        bound="compute" if compute >= memory else "memory",
        predicted_seconds=max(compute, memory),
    )
    if measured_seconds is None:
        return out
    if measured_seconds <= 0:
        raise ValueError(f"measured time must be positive, got {measured_seconds}")
    return dataclasses.replace(
        out,
        measured_seconds=measured_seconds,
        efficiency=out.predicted_seconds / measured_seconds,
        mfu=flops / measured_seconds / peak_flops_per_s,
        mbu=nbytes / measured_seconds / bandwidth_bytes_per_s,
    )


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A sharded step's predicted seconds as three terms, per device."""

    compute_seconds: float  # FLOPs / peak
    memory_seconds: float  # bytes / memory bandwidth
    communication_seconds: float  # link bytes / link bandwidth (one direction)
    predicted_seconds: float  # max(compute, memory) + communication: collectives not overlapped

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def step_time(
    flops: float,
    nbytes: float,
    link_bytes: float,
    peak_flops_per_s: float,
    bandwidth_bytes_per_s: float,
    link_bytes_per_s: float,
) -> StepTime:
    """Per-device compute, memory and communication terms of a step. Communication is added, not
    overlapped: XLA runs the train step's collectives between the matmuls that need them (on the CPU
    backend synchronously), so this is the bound with no overlap."""
    if min(peak_flops_per_s, bandwidth_bytes_per_s, link_bytes_per_s) <= 0:
        raise ValueError("peaks and link bandwidth must be positive")
    compute = flops / peak_flops_per_s
    memory = nbytes / bandwidth_bytes_per_s
    comm = link_bytes / link_bytes_per_s
    return StepTime(compute, memory, comm, max(compute, memory) + comm)
