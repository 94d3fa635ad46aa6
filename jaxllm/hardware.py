"""Device peaks: published data-sheet figures, and calibration of the device at hand.

``published(device_kind)`` looks up the vendor's dense bf16 matmul peak, memory bandwidth and
capacity (each with its source); ``calibrate()`` measures what this device achieves: matmul FLOP/s in
float32 and with bf16 inputs accumulated in float32, and the bandwidth of a donated in-place copy.
Calibrations are cached per device in ``$JAXLLM_CACHE_DIR`` (default ``~/.cache/jaxllm``) with their
date and versions. On a CPU the calibrated figures are the roofline; on a GPU/TPU both are shown.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.timing import time_compiled


@dataclasses.dataclass(frozen=True)
class Published:
    name: str
    bf16_flops_per_s: float  # dense (no sparsity) bf16 matmul peak
    bandwidth_bytes_per_s: float
    memory_bytes: float
    source: str


_TB, _GB = 1e12, 1e9
# Ordered: the first pattern that matches jax.devices()[0].device_kind (lower-cased) wins.
PUBLISHED: list[tuple[str, Published]] = [
    (
        r"h100.*pcie",
        Published(
            "H100 PCIe", 756e12, 2.0 * _TB, 80 * _GB, "NVIDIA H100 Tensor Core GPU datasheet"
        ),
    ),
    (
        r"h100",
        Published(
            "H100 SXM", 989e12, 3.35 * _TB, 80 * _GB, "NVIDIA H100 Tensor Core GPU datasheet (SXM)"
        ),
    ),
    (
        r"h200",
        Published(
            "H200 SXM", 989e12, 4.8 * _TB, 141 * _GB, "NVIDIA H200 Tensor Core GPU datasheet"
        ),
    ),
    (
        r"a100.*80",
        Published(
            "A100 80GB SXM", 312e12, 2.039 * _TB, 80 * _GB, "NVIDIA A100 Tensor Core GPU datasheet"
        ),
    ),
    (
        r"v5 ?lite|v5e",
        Published("TPU v5e", 197e12, 819 * _GB, 16 * _GB, "cloud.google.com/tpu/docs/v5e"),
    ),
    (
        r"v5p|v5$",
        Published("TPU v5p", 459e12, 2765 * _GB, 95 * _GB, "cloud.google.com/tpu/docs/v5p"),
    ),
    (
        r"v6 ?lite|v6e",
        Published("TPU v6e", 918e12, 1638 * _GB, 32 * _GB, "cloud.google.com/tpu/docs/v6e"),
    ),
]


def device_kind() -> str:
    return jax.devices()[0].device_kind


def published(kind: str | None = None) -> Published | None:
    """The data-sheet peaks of ``kind`` (default: this process's first device), None if unknown."""
    kind = (kind if kind is not None else device_kind()).lower()
    return next((p for pattern, p in PUBLISHED if re.search(pattern, kind)), None)


def _matmul_flops_per_s(n: int, dtype: Any, repeats: int) -> float:
    """Achieved FLOP/s of an [n, n] @ [n, n] matmul in ``dtype`` with float32 accumulation."""
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    a = jnp.ones((n, n), dtype)
    compiled = dot.lower(a, a).compile()
    timing = time_compiled(compiled, lambda: (a, a), repeats=repeats, warmup=1)
    return 2 * n**3 / timing.seconds_median


def _copy_bytes_per_s(nbytes: int, repeats: int) -> float:
    """Achieved bytes/s of y = x + 1 on a donated float32 array: it reads and writes every byte."""
    step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    n = nbytes // 4
    compiled = step.lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile()
    timing = time_compiled(
        compiled, lambda: (jnp.zeros((n,), jnp.float32),), repeats=repeats, warmup=1
    )
    return 2 * n * 4 / timing.seconds_median


def measure(quick: bool = False) -> dict[str, Any]:
    """Calibrates this device now (about 1 s quick, a few seconds otherwise)."""
    n, nbytes, repeats = (1024, 64 << 20, 3) if quick else (2048, 256 << 20, 5)
    return {
        "device_kind": device_kind(),
        "platform": jax.devices()[0].platform,
        "f32_flops_per_s": _matmul_flops_per_s(n, jnp.float32, repeats),
        "bf16_flops_per_s": _matmul_flops_per_s(n, jnp.bfloat16, repeats),
        "copy_bytes_per_s": _copy_bytes_per_s(nbytes, repeats),
        "matmul_n": n,
        "copy_bytes": nbytes,
        "quick": quick,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__,  # pyright: ignore[reportAttributeAccessIssue]
    }


def cache_path() -> Path:
    root = os.environ.get("JAXLLM_CACHE_DIR") or Path.home() / ".cache" / "jaxllm"
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind().lower()).strip("-")
    return Path(root) / f"calibration-{slug}.json"


def calibrate(refresh: bool = False, quick: bool = False) -> dict[str, Any]:
    """This device's calibration: read from the cache unless ``refresh`` or the cached one was made
    with other versions (or is a quick one when a full one is asked for); measured and saved otherwise."""
    path = cache_path()
    if not refresh and path.exists():
        cached = json.loads(path.read_text())
        same = cached.get("jax") == jax.__version__ and cached.get("quick") in (False, quick)
        if same:
            return cached
    result = measure(quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def roofline_peaks(
    calibration: dict[str, Any], dtype: str, data_sheet: bool = True
) -> dict[str, Any]:
    """The peaks a roofline uses for matmuls in ``dtype``: calibrated on a CPU (or with
    ``data_sheet=False``), the data sheet's on a known accelerator (bf16; float32 matmuls keep the
    calibrated figure, as data sheets differ on what an f32 matmul may use)."""
    key = "bf16_flops_per_s" if dtype in ("bfloat16", "float16") else "f32_flops_per_s"
    sheet = published(calibration["device_kind"]) if data_sheet else None
    if calibration["platform"] == "cpu" or sheet is None:
        return {
            "flops_per_s": calibration[key],
            "bandwidth_bytes_per_s": calibration["copy_bytes_per_s"],
            "source": f"calibrated ({calibration['date']})",
        }
    flops = sheet.bf16_flops_per_s if key == "bf16_flops_per_s" else calibration[key]
    return {
        "flops_per_s": flops,
        "bandwidth_bytes_per_s": sheet.bandwidth_bytes_per_s,
        "source": sheet.source,
    }
