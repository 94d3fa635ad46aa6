import os
import resource
import subprocess
import sys

import pytest

from jaxllm import memory

GIB = 2**30


def _proc(tmp_path, cgroup_lines, vmsize_kib=1024):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    (proc / "status").write_text(f"Name:\tpython\nVmSize:\t{vmsize_kib} kB\n")
    return proc


def test_cgroup_v2_limit_minus_usage(tmp_path):
    group = tmp_path / "cg" / "job"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(f"{4 * GIB}\n")
    (group / "memory.current").write_text(f"{GIB}\n")
    proc = _proc(tmp_path, ["0::/job"])
    assert memory.cgroup_available(tmp_path / "cg", proc) == 3 * GIB
    (group / "memory.max").write_text("max\n")
    assert memory.cgroup_available(tmp_path / "cg", proc) is None


def test_cgroup_v1_limit_minus_usage(tmp_path):
    group = tmp_path / "cg" / "memory" / "job"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    (group / "memory.usage_in_bytes").write_text(f"{GIB // 2}\n")
    proc = _proc(tmp_path, ["5:cpu:/", "4:memory:/job", "0::/"])
    assert memory.cgroup_available(tmp_path / "cg", proc) == GIB + GIB // 2
    (group / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory.cgroup_available(tmp_path / "cg", proc) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert memory.cgroup_available(tmp_path / "none", _proc(tmp_path, ["0::/"])) is None


def test_ulimit_v_leaves_the_limit_minus_the_virtual_size(tmp_path, monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (3 * GIB, resource.RLIM_INFINITY))
    proc = _proc(tmp_path, [], vmsize_kib=GIB // 1024)
    assert memory.address_space_available(proc) == 2 * GIB
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    assert memory.address_space_available(proc) is None


def test_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemAvailable:  2048 kB\n")
    assert memory.host_available(meminfo) == 2048 * 1024


class FakeDevice:
    platform = "gpu"

    def memory_stats(self):
        return {"bytes_limit": 80 * GIB, "bytes_in_use": 30 * GIB}


def test_an_accelerator_reports_its_allocator(monkeypatch):
    assert memory.device_available(FakeDevice()) == 50 * GIB  # pyright: ignore[reportArgumentType]
    monkeypatch.setattr(memory, "device_available", lambda: 50 * GIB)
    monkeypatch.setattr(memory, "host_available", lambda: 1)  # host limits do not apply
    assert memory.available_bytes() == 50 * GIB


def test_on_a_cpu_the_least_limit_wins(monkeypatch):
    monkeypatch.setattr(memory, "device_available", lambda: None)
    monkeypatch.setattr(memory, "host_available", lambda: 8 * GIB)
    monkeypatch.setattr(memory, "cgroup_available", lambda: 3 * GIB)
    monkeypatch.setattr(memory, "address_space_available", lambda: None)
    assert memory.available_bytes() == 3 * GIB


@pytest.mark.parametrize("room", [2 * GIB, 4 * GIB])
def test_a_real_ulimit_v_bounds_what_is_available(room):
    """A child process sets RLIMIT_AS to its virtual size + ``room``; available_bytes sees it."""
    code = (
        "import resource\n"
        "import jax\n"
        "from jaxllm import memory\n"
        "jax.devices()\n"  # the backend's own address space, mapped before the limit is set
        "size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (size + {room}, resource.RLIM_INFINITY))\n"
        "print(memory.available_bytes())\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # host memory: on a GPU the device's would answer
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert 0 < int(out.stdout) <= room
    # The limit, less what the process maps meanwhile (malloc arenas).
    assert int(out.stdout) > room // 2
