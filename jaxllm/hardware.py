"""Device peaks: published data-sheet figures, and calibration of the device at hand.

``published(device_kind)`` looks up the vendor's dense matmul peaks (bf16, TF32, full f32), memory
bandwidth and capacity, each with its source. ``calibrate()`` measures what this device achieves:

- matmul FLOP/s with bf16 inputs accumulated in f32 (on a CPU without bf16 arithmetic, widened to
  f32 as the model's products are), in full-precision f32, and on a GPU in TF32
  (what an f32 matmul at JAX's default precision runs as there), at sizes that reach the peak
  (8192³ bf16 on an accelerator; on a CPU the side climbs until the rate stops rising);
- the read bandwidth of a streaming read (the faster of ``jnp.sum`` and a matrix-vector product
  over ≥ 1 GiB), the memory roof: a decode step mostly reads, and nothing that runs on the device
  reads faster;
- the bandwidth of a donated in-place ``x + 1`` (read + write), shown beside it.

Each figure is the best of several timed repeats after a warm-up: a roof is what the device can do. On a known accelerator a
calibrated peak above the data sheet by more than 5%, or below 60% of it, is listed in ``suspect``
and flagged wherever it is used. Calibrations are cached per device in ``$JAXLLM_CACHE_DIR`` (default
``~/.cache/jaxllm``) with their date and versions; a damaged cache is measured afresh, with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxllm import products

FORMAT = 4  # bumped when the calibration's fields change; older caches are measured afresh


@dataclasses.dataclass(frozen=True)
class Published:
    name: str
    bf16_flops_per_s: float  # dense (no sparsity) bf16 matmul peak
    bandwidth_bytes_per_s: float
    memory_bytes: float
    source: str
    tf32_flops_per_s: float | None = None  # dense TF32 tensor-core peak (NVIDIA only)
    f32_flops_per_s: float | None = None  # full-precision f32 (CUDA cores on NVIDIA)
    # Interconnect, bytes/s per device in each direction (a ring collective is bound by one
    # direction): within a node (NVLink, TPU ICI) and between nodes (the node's network per device).
    link_bytes_per_s: float | None = None
    network_bytes_per_s: float | None = None
    link_source: str = ""


_T, _TB, _GB = 1e12, 1e12, 1e9
_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
# NVLink 4 (H100 SXM, H200 SXM): 900 GB/s per GPU, both directions together; NVLink bridge (H100 PCIe)
# 600 GB/s; NVLink 3 (A100 SXM) 600 GB/s. Between nodes: a DGX/HGX H100 or H200 node has one 400 Gb/s
# ConnectX-7 InfiniBand port per GPU (NVIDIA DGX H100 datasheet), 50 GB/s each way.
_NVLINK = (
    "NVLink per GPU: https://www.nvidia.com/en-us/data-center/h100/ (900 GB/s SXM, 600 GB/s PCIe), "
    "https://www.nvidia.com/en-us/data-center/h200/ (900 GB/s), "
    "https://www.nvidia.com/en-us/data-center/a100/ (600 GB/s); halved for one direction. "
    "Network: 400 Gb/s ConnectX-7 InfiniBand per GPU (NVIDIA DGX H100 datasheet)"
)
_NDR = 50 * _GB  # 400 Gb/s InfiniBand NDR per GPU, one direction
# Ordered: the first pattern that matches jax.devices()[0].device_kind (lower-cased) wins.
PUBLISHED: list[tuple[str, Published]] = [
    (
        r"h100.*pcie",
        Published(
            "H100 PCIe",
            756 * _T,
            2.0 * _TB,
            80 * _GB,
            _H100,
            378 * _T,
            51 * _T,
            300 * _GB,
            _NDR,
            _NVLINK,
        ),
    ),
    (
        r"h100",
        Published(
            "H100 SXM",
            989 * _T,
            3.35 * _TB,
            80 * _GB,
            _H100 + " (SXM)",
            494 * _T,
            67 * _T,
            450 * _GB,
            _NDR,
            _NVLINK,
        ),
    ),
    (
        r"h200",
        Published(
            "H200 SXM",
            989 * _T,
            4.8 * _TB,
            141 * _GB,
            "NVIDIA H200 Tensor Core GPU datasheet",
            494 * _T,
            67 * _T,
            450 * _GB,
            _NDR,
            _NVLINK,
        ),
    ),
    (
        r"a100.*80",
        Published(
            "A100 80GB SXM",
            312 * _T,
            2.039 * _TB,
            80 * _GB,
            "NVIDIA A100 Tensor Core GPU datasheet",
            156 * _T,
            19.5 * _T,
            300 * _GB,
            None,
            _NVLINK,
        ),
    ),
    (
        r"v5 ?lite|v5e",
        Published("TPU v5e", 197 * _T, 819 * _GB, 16 * _GB, "cloud.google.com/tpu/docs/v5e"),
    ),
    (
        r"v5p|v5$",
        Published("TPU v5p", 459 * _T, 2765 * _GB, 95 * _GB, "cloud.google.com/tpu/docs/v5p"),
    ),
    (
        r"v6 ?lite|v6e",
        Published("TPU v6e", 918 * _T, 1638 * _GB, 32 * _GB, "cloud.google.com/tpu/docs/v6e"),
    ),
]
SUSPECT_ABOVE, SUSPECT_BELOW = 1.05, 0.60  # calibrated / data sheet outside these is suspect


def device_kind() -> str:
    return jax.devices()[0].device_kind


def published(kind: str | None = None) -> Published | None:
    """The data-sheet peaks of ``kind`` (default: this process's first device), None if unknown."""
    kind = (kind if kind is not None else device_kind()).lower()
    return next((p for pattern, p in PUBLISHED if re.search(pattern, kind)), None)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one calibration runs: matmul sides, bytes streamed, calls per timed repeat."""

    matmul_n: tuple[int, ...]  # bf16 and TF32 products [n, n] @ [n, n], sides climbed in order
    f32_n: tuple[int, ...]  # full-precision f32 products (slow on tensor-core GPUs)
    read_bytes: int
    copy_bytes: int
    calls: int  # back-to-back calls per timed repeat (amortises dispatch on an accelerator)
    repeats: int


SPREAD_LIMIT = 1.25  # repeats of one figure further apart than this: the device was busy
CLIMB = 1.1  # the matmul side climbs while each side runs 10% faster than the one before


def sizes(platform: str, quick: bool) -> Sizes:
    """Peak-reaching sizes per platform; ``quick`` is for tests (about a second anywhere).

    On a CPU the matmul side climbs 1024 -> 2048 -> 4096 and stops at the first side not ``CLIMB``
    faster than the one before: where the rate peaks differs by machine (measured: 2048³ f32 156
    GFLOP/s and 4096³ 118 on a 2-core AVX2 host, 126 and 245 on a 2-core AMX one), and 4096³ costs
    seconds a call.
    """
    if quick:
        return Sizes((512,), (512,), 64 << 20, 64 << 20, 1, 3)
    if platform == "cpu":
        return Sizes((1024, 2048, 4096), (1024, 2048, 4096), 1 << 30, 256 << 20, 1, 3)
    return Sizes((8192,), (4096,), 2 << 30, 1 << 30, 10, 5)


class Timing(NamedTuple):
    """Seconds per call: the fastest repeat, and the slowest repeat over the fastest (>= 1)."""

    seconds: float
    spread: float

    @classmethod
    def of(cls, times: list[float]) -> Timing:
        return cls(min(times), max(times) / min(times))


class Figure(NamedTuple):
    """A calibrated rate (FLOP/s or bytes/s) and the spread of the timing it came from."""

    value: float
    spread: float


def _seconds_per_call(fn: Callable[..., Any], args: tuple, size: Sizes) -> Timing:
    """Seconds per call: the fastest of ``size.repeats`` timings of ``size.calls`` back-to-back
    calls (a roof is the best the device does; slower repeats measure interference)."""
    jax.block_until_ready(fn(*args))  # warm-up (compiled on first call)
    times = []
    for _ in range(size.repeats):
        start = time.perf_counter()
        out = [fn(*args) for _ in range(size.calls)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / size.calls)
    return Timing.of(times)


def product(dtype: Any, precision: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """a [m, k] @ b [k, n] in ``dtype`` accumulated in f32, as the model computes its products: a
    narrow one on operands widened to f32 where ``jaxllm.products.widens_products``."""
    if products.widens_products(dtype):
        return lambda a, b: jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
    return lambda a, b: jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _matmul_flops_per_s(sides: tuple[int, ...], dtype: Any, precision: str, size: Sizes) -> Figure:
    """The best achieved FLOP/s of [n, n] @ [n, n] products in ``dtype`` accumulated in f32 (a
    narrow product widened where the model's are: ``jaxllm.products.widens_products``), n climbing
    through ``sides`` while each side is ``CLIMB`` faster than the one before; and the spread of
    that side's repeats."""
    dot = jax.jit(product(dtype, precision))
    best = Figure(0.0, 1.0)
    for n in sides:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        timing = _seconds_per_call(dot, (a, a), size)
        rate = Figure(2 * n**3 / timing.seconds, timing.spread)
        if rate.value < best.value * CLIMB:
            return max(rate, best, key=lambda f: f.value)
        best = rate
    return best


def _read_bytes_per_s(size: Sizes) -> Figure:
    """Achieved bytes/s reading ``size.read_bytes`` of f32 once: the faster of a jitted ``jnp.sum``
    and a product of the array (as [n, 4096] rows) with a vector, which XLA:CPU spreads over every
    core where it runs the sum on one (measured on 2 cores: 29 and 34 GB/s); and its spread."""
    x = jnp.ones((size.read_bytes // 4,), jnp.float32)
    rows, ones = x.reshape(-1, 4096), jnp.ones((4096,), jnp.float32)
    fastest = min(
        _seconds_per_call(jax.jit(jnp.sum), (x,), size),
        _seconds_per_call(jax.jit(jnp.matmul), (rows, ones), size),
    )
    return Figure(size.read_bytes / fastest.seconds, fastest.spread)


def _copy_bytes_per_s(size: Sizes) -> Figure:
    """Achieved bytes/s of y = x + 1 on a donated f32 array (each byte read and written once), and
    the spread of its repeats."""
    step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jnp.zeros((size.copy_bytes // 4,), jnp.float32)
    x = step(x)  # compile and warm up
    times = []
    for _ in range(size.repeats):
        jax.block_until_ready(x)
        start = time.perf_counter()
        for _ in range(size.calls):
            x = step(x)
        jax.block_until_ready(x)
        times.append((time.perf_counter() - start) / size.calls)
    timing = Timing.of(times)
    return Figure(2 * size.copy_bytes / timing.seconds, timing.spread)


PEAK_KEYS = (
    "bf16_flops_per_s",
    "f32_flops_per_s",
    "tf32_flops_per_s",
    "read_bytes_per_s",
    "copy_bytes_per_s",
)


def _measure_peaks(platform: str, size: Sizes) -> dict[str, Any]:
    """The five figures, and ``spread``: for each, its slowest timed repeat over its fastest."""
    figures = {
        "bf16_flops_per_s": _matmul_flops_per_s(size.matmul_n, jnp.bfloat16, "default", size),
        "f32_flops_per_s": _matmul_flops_per_s(size.f32_n, jnp.float32, "highest", size),
        "tf32_flops_per_s": (
            None
            if platform == "cpu"
            else _matmul_flops_per_s(size.matmul_n, jnp.float32, "default", size)
        ),
        "read_bytes_per_s": _read_bytes_per_s(size),
        "copy_bytes_per_s": _copy_bytes_per_s(size),
    }
    out: dict[str, Any] = {k: None if v is None else v.value for k, v in figures.items()}
    out["spread"] = {k: v.spread for k, v in figures.items() if v is not None}
    return out


def _busy(calibration: dict[str, Any]) -> list[str]:
    """One line per figure whose timed repeats disagree by more than ``SPREAD_LIMIT``."""
    return [
        f"{key}: its timed repeats differ by {spread - 1:.0%} (the device was busy; remeasure)"
        for key, spread in calibration.get("spread", {}).items()
        if spread > SPREAD_LIMIT
    ]


def suspect(calibration: dict[str, Any]) -> list[str]:
    """One line per calibrated peak outside [60%, 105%] of the device's data sheet, and one per
    figure whose repeats disagree by more than ``SPREAD_LIMIT`` ([] if none)."""
    lines = _busy(calibration)
    sheet = published(calibration["device_kind"])
    if sheet is None or calibration["platform"] == "cpu":
        return lines
    pairs = [
        ("bf16_flops_per_s", sheet.bf16_flops_per_s),
        ("tf32_flops_per_s", sheet.tf32_flops_per_s),
        ("f32_flops_per_s", sheet.f32_flops_per_s),
        ("read_bytes_per_s", sheet.bandwidth_bytes_per_s),
    ]
    for key, ref in pairs:
        value = calibration.get(key)
        if value and ref and not SUSPECT_BELOW <= value / ref <= SUSPECT_ABOVE:
            lines.append(f"{key} {value:.3g} is {value / ref:.0%} of the data sheet's {ref:.3g}")
    return lines


def _json(value: Any) -> Any:
    """A value as JSON gives it back (tuples as lists), so a cached calibration equals a fresh one."""
    return list(value) if isinstance(value, tuple) else value


def measure(quick: bool = False) -> dict[str, Any]:
    """Calibrates this device now (about a second quick; under 10 s on a CPU, seconds on a GPU)."""
    device = jax.devices()[0]
    size = sizes(device.platform, quick)
    out: dict[str, Any] = {"device_kind": device.device_kind, "platform": device.platform}
    out |= _measure_peaks(device.platform, size)
    out |= {f"size_{k}": _json(v) for k, v in dataclasses.asdict(size).items()}
    out |= {
        "quick": quick,
        "format": FORMAT,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
    }
    out["suspect"] = suspect(out)
    return out


def cache_path() -> Path:
    root = os.environ.get("JAXLLM_CACHE_DIR") or Path.home() / ".cache" / "jaxllm"
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind().lower()).strip("-")
    return Path(root) / f"calibration-{slug}.json"


def _warn(message: str) -> None:
    print(f"jaxllm: warning: {message}", file=sys.stderr)


def _read_cache(path: Path, quick: bool) -> dict[str, Any] | None:
    """The cached calibration if it is usable for this run; None (with a warning if damaged)."""
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        _warn(f"calibration cache {path} is unreadable ({err}); measuring again")
        return None
    if not isinstance(cached, dict) or cached.get("format") != FORMAT:
        _warn(f"calibration cache {path} is not a calibration of this version; measuring again")
        return None
    if cached.get("jax") != jax.__version__ or cached.get("quick") not in (False, quick):
        return None
    damage = _damage(cached)
    if damage:
        _warn(f"calibration cache {path} is damaged ({damage}); measuring again")
        return None
    return cached


def _damage(cached: dict[str, Any]) -> str | None:
    """What makes a cached calibration of this version unusable: a peak that is not a positive
    finite number (tf32 may be absent: a CPU has none), spreads that are not numbers, a device
    kind or platform that is not a string; None if nothing does."""
    for key in PEAK_KEYS:
        value = cached.get(key)
        if not _positive_number(value) and not (key == "tf32_flops_per_s" and value is None):
            return f"{key} is {value!r}, not a positive number"
    spread = cached.get("spread")
    if not isinstance(spread, dict) or not all(map(_positive_number, spread.values())):
        return f"spread is {spread!r}, not numbers by figure"
    for key in ("device_kind", "platform"):
        if not isinstance(cached.get(key), str):
            return f"{key} is {cached.get(key)!r}, not a string"
    return None


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def calibrate(refresh: bool = False, quick: bool = False) -> dict[str, Any]:
    """This device's calibration: read from the cache unless ``refresh`` or the cached one was made
    with other versions (or is a quick one when a full one is asked for); measured and saved otherwise.
    A cache that cannot be written costs a warning, not the measurement."""
    path = cache_path()
    cached = None if refresh else _read_cache(path, quick)
    if cached is not None:
        return cached
    result = measure(quick)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    except OSError as err:
        _warn(f"could not save the calibration to {path} ({err})")
    for line in result["suspect"]:
        _warn(f"suspect calibration: {line}")
    return result


def matmul_key(calibration: dict[str, Any], dtype: str) -> str:
    """The calibrated peak that matmuls in ``dtype`` run at: bf16; on a GPU, f32 at JAX's default
    precision runs as TF32 (full f32 only under ``jax_default_matmul_precision='highest'``)."""
    if dtype in ("bfloat16", "float16"):
        return "bf16_flops_per_s"
    precision = str(getattr(jax.config, "jax_default_matmul_precision", None) or "default").lower()
    tf32 = calibration.get("tf32_flops_per_s") and precision not in ("highest", "float32")
    return "tf32_flops_per_s" if tf32 else "f32_flops_per_s"


@dataclasses.dataclass(frozen=True)
class Peaks:
    """The ceilings a roofline is drawn against."""

    flops_per_s: float  # the matmul peak of the config's dtype
    bandwidth_bytes_per_s: float  # the read bandwidth: the memory roof
    matmul: str  # "bf16", "tf32" or "f32": which matmul peak that is
    source: str  # "calibrated (DATE)", or the data sheet's source
    suspect: tuple[str, ...] = ()  # calibrated figures outside the data sheet's plausible range

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "suspect": list(self.suspect)}


def roofline_peaks(calibration: dict[str, Any], dtype: str, data_sheet: bool = True) -> Peaks:
    """The peaks a roofline uses for matmuls in ``dtype``: calibrated on a CPU (or with
    ``data_sheet=False``), the data sheet's on a known accelerator. The memory roof is the read
    bandwidth."""
    key = matmul_key(calibration, dtype)
    matmul = key.removesuffix("_flops_per_s")
    sheet = published(calibration["device_kind"]) if data_sheet else None
    flops = getattr(sheet, key, None) if sheet is not None else None
    if calibration["platform"] == "cpu" or sheet is None or flops is None:
        return Peaks(
            flops_per_s=calibration[key],
            bandwidth_bytes_per_s=calibration["read_bytes_per_s"],
            matmul=matmul,
            source=f"calibrated ({calibration['date']})",
            suspect=tuple(calibration.get("suspect", [])),
        )
    return Peaks(flops, sheet.bandwidth_bytes_per_s, matmul, sheet.source)
