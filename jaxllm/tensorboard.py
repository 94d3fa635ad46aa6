"""Training metrics as TensorBoard scalars (``jaxllm train --tensorboard DIR``), written with
tensorboardX, the optional ``tensorboard`` extra (``pip install 'jaxllm[tensorboard]'``).

Tags, by step (updates applied): ``train/loss``, ``train/grad_norm``, ``train/lr``, ``train/step_s``,
``train/tokens_per_s`` per update, ``val/loss`` per validation; losses in nats per token, as in
``metrics.jsonl``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxllm.errors import InputError

PACKAGE = "tensorboardX"


def require() -> None:
    """InputError unless tensorboardX is installed (checked before a run starts)."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise InputError(
            f"--tensorboard needs the {PACKAGE} package: pip install 'jaxllm[tensorboard]'"
        )


class EventWriter:
    """An event file under ``log_dir``. ``purge_step``: a resumed run's first step; TensorBoard
    hides the events at or after it that an earlier attempt wrote, as ``metrics.jsonl`` drops them."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        require()
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One scalar per tag at ``step``."""
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush the event file and close it."""
        self._writer.close()
