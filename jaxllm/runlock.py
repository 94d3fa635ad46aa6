"""One writer per run directory: an exclusive ``fcntl.flock`` on the directory itself.

The operating system releases the lock when the process ends, however it ends (a SIGKILL included), so
a killed run never blocks its own resume; a second process on the same directory is refused at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from jaxllm.errors import InputError


class RunDirInUseError(InputError):
    """Another process holds the run directory (exit status 2: the command was refused)."""


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir`` (an existing directory) exclusively while the block runs."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUseError(
                f"{run_dir} is in use by another process training into it; wait for it to end "
                "or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
