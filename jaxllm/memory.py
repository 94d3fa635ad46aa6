"""Memory this process may use, in bytes: the least of what the host, its cgroup, its address-space
limit (``ulimit -v``) and, on an accelerator, the device allocator can still give.

Each source is a small function that returns None where it sets no limit, so ``available_bytes`` is the
minimum over the limits that exist. Paths are parameters so that tests can point them at fake files.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import jax

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF = Path("/proc/self")
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number (about 2**63 rounded to pages)


def host_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's MemAvailable; its physical memory where /proc is missing."""
    try:
        info = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) -> None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> tuple[Path | None, Path | None]:
    """(v2 directory, v1 memory directory) of this process's cgroup, where they exist."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    v2 = v1 = None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and (root / rel.lstrip("/") / "memory.max").exists():
            v2 = root / rel.lstrip("/")
        elif "memory" in controllers.split(","):
            for base in (root / "memory" / rel.lstrip("/"), root / "memory"):
                if (base / "memory.limit_in_bytes").exists():
                    v1 = base
                    break
    return v2, v1


def cgroup_available(root: Path = CGROUP_ROOT, proc: Path = PROC_SELF) -> int | None:
    """The cgroup's memory limit minus its usage (v2 memory.max - memory.current, v1
    memory.limit_in_bytes - memory.usage_in_bytes); None when there is no limit."""
    v2, v1 = _cgroup_dirs(root, proc / "cgroup")
    if v2 is not None:
        limit, used = _read_int(v2 / "memory.max"), _read_int(v2 / "memory.current")
    elif v1 is not None:
        limit, used = (
            _read_int(v1 / "memory.limit_in_bytes"),
            _read_int(v1 / "memory.usage_in_bytes"),
        )
    else:
        return None
    if limit is None or limit >= _NO_LIMIT:
        return None
    return max(0, limit - (used or 0))


def address_space_available(proc: Path = PROC_SELF) -> int | None:
    """``ulimit -v`` (RLIMIT_AS) minus the process's virtual size (VmSize); None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        status = dict(
            line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line
        )
        used = int(status["VmSize"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        used = 0
    return max(0, soft - used)


def device_available(device: Any = None) -> int | None:
    """An accelerator's allocator limit minus what is in use (of ``device``, default the first);
    None on a CPU (host memory applies)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def host_bytes() -> int:
    """Bytes this process may still allocate on the host: the least of MemAvailable, the cgroup's
    room and ``ulimit -v``'s room."""
    limits = [host_available(), cgroup_available(), address_space_available()]
    return min(x for x in limits if x is not None)


def available_bytes() -> int:
    """Bytes this process may still allocate where its arrays live: the device's free memory on an
    accelerator, the host's (``host_bytes``) on a CPU."""
    device = device_available()
    return host_bytes() if device is None else device


def gib(n: float) -> str:
    """Bytes as GiB with two decimals, for messages: 2147483648 -> '2.00 GiB'."""
    return f"{n / 2**30:.2f} GiB"
