"""Many processes: ``jax.distributed`` started from flags or from the environment JAX itself reads.

``--coordinator HOST:PORT --num-processes N --process-id I`` (each process the same coordinator and
N, its own I in [0, N)) start JAX's distributed runtime before anything else touches JAX; a flag left
out is filled by JAX (``JAX_COORDINATOR_ADDRESS``, or a Slurm / Open MPI / Kubernetes / Cloud TPU
environment, ``jax._src.clusters``). Setting ``JAX_COORDINATOR_ADDRESS`` alone also asks for it.
Then ``jax.devices()`` holds every process's devices, a mesh spans them all, and each process feeds
only the rows of a batch that its own devices hold (``global_batch``). On the CPU, collectives
between processes go through gloo.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Sharding

from jaxllm.errors import InputError, RunError, positive_int

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
INIT_TIMEOUT_S = 300  # seconds a process waits for all the others to reach the coordinator


def check_address(address: str, name: str = "--coordinator") -> str:
    """``address`` if it reads HOST:PORT with a port in [1, 65535]; InputError naming it otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(f"{name} must be HOST:PORT with PORT in [1, 65535], got {address!r}")
    return address


@dataclasses.dataclass(frozen=True)
class Processes:
    """The processes of a run as the flags give them; None: left to JAX (or one process)."""

    coordinator: str | None = None  # HOST:PORT of process 0's coordination service
    num_processes: int | None = None  # N >= 1
    process_id: int | None = None  # in [0, N)

    def __post_init__(self) -> None:
        if self.coordinator is not None:
            check_address(self.coordinator)
        if self.num_processes is not None:
            positive_int("--num-processes", self.num_processes)
        pid, n = self.process_id, self.num_processes
        if pid is not None:
            positive_int("--process-id", pid, least=0)
        if pid is not None and n is not None and pid >= n:
            raise InputError(f"--process-id must be in [0, --num-processes={n}), got {pid}")

    def asked(self) -> bool:
        """Whether a flag or ``JAX_COORDINATOR_ADDRESS`` asks for the distributed runtime."""
        given = (self.coordinator, self.num_processes, self.process_id)
        return any(v is not None for v in given) or COORDINATOR_ENV in os.environ


def initialize(processes: Processes) -> None:
    """Start ``jax.distributed`` if ``processes.asked()`` (call before anything else uses JAX):
    InputError if what the flags and the environment give together is incomplete or out of range,
    RunError if the processes do not all reach the coordinator within ``INIT_TIMEOUT_S``."""
    if not processes.asked():
        return
    if processes.coordinator is None and COORDINATOR_ENV in os.environ:
        check_address(os.environ[COORDINATOR_ENV], COORDINATOR_ENV)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            processes.coordinator,
            processes.num_processes,
            processes.process_id,
            initialization_timeout=INIT_TIMEOUT_S,
        )
    except (ValueError, TypeError) as err:  # JAX's own checks of what it was given or found
        raise InputError(
            f"cannot start {processes.num_processes or '?'} processes: {err}"
        ) from None
    except jax.errors.JaxRuntimeError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise RunError(f"the processes did not all join the coordinator: {first}") from None


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, metrics and the summary."""
    return jax.process_index() == 0


def global_batch(batch: np.ndarray, sharding: Sharding) -> jax.Array:
    """``batch`` (the whole global batch, the same in every process) as one array laid out by
    ``sharding``; each process transfers only the slices its own devices hold."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
