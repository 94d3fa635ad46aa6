"""What a training run tells its user and leaves behind: a progress bar on a terminal (tqdm), plain log
lines otherwise, every step's metrics appended as JSON lines to ``RUN_DIR/metrics.jsonl``, and the
same as TensorBoard scalars when asked (``jaxllm.tensorboard``).

Records (one JSON object per line):
  {"kind": "train", "step", "loss", "grad_norm", "lr", "step_s", "tokens_per_s", "elapsed_s"}
  {"kind": "val", "step", "val_loss", "elapsed_s"}
``step`` counts updates applied (the state after the record's update); losses are nats per token (a
byte, or a token of a fine-tuning run's tokenizer).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from jaxllm.errors import RunError
from jaxllm.tensorboard import EventWriter

METRICS_FILE = "metrics.jsonl"
# "5/10 [####------], loss 2.5  100 tok/s  ETA 5s" (tqdm puts the ", " before the postfix);
# throughput and ETA come from the steps' own times, not tqdm's clock.
_BAR_FORMAT = "{n}/{total} [{bar:24}]{postfix}"


def format_seconds(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsError(RunError):
    """A ``metrics.jsonl`` damaged before its last line (exit status 1)."""


def _record_step(line: str) -> int | None:
    """The ``step`` of one JSON line, or None if the line is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def truncate_metrics(run_dir: str | Path, step: int) -> list[str]:
    """Drop records after ``step``: a resumed run rewrites the steps its predecessor did not save.

    A last line that is not a whole record is what a crash or a full disk leaves mid-write: it is
    dropped, and the returned notes say so. A damaged line before the last raises MetricsError
    naming the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    notes, steps = [], [_record_step(line) for line in lines]
    if steps and steps[-1] is None:
        notes.append(f"{path}: dropped a torn last line (line {len(lines)}: {lines[-1]!r:.60})")
        lines, steps = lines[:-1], steps[:-1]
    for number, (line, found) in enumerate(zip(lines, steps, strict=True), 1):
        if found is None:
            raise MetricsError(f"{path} line {number} is not a metrics record: {line!r:.80}")
    kept = [
        f"{line}\n" for line, s in zip(lines, steps, strict=True) if s is not None and s <= step
    ]
    path.write_text("".join(kept))
    return notes


class Reporter:
    """Shows progress on ``stream`` and appends metrics to ``RUN_DIR/metrics.jsonl`` (and to
    ``events``, a TensorBoard writer, if given).

    Throughput counts only the steps' own time (``step_s``), not evaluation or checkpointing, and
    leaves out the first step of a process, which includes compilation.
    """

    def __init__(
        self,
        run_dir: Path | None,
        total_steps: int,
        tokens_per_step: int,
        stream: TextIO,
        log_every: int,
        append: bool = False,
        unit: str = "byte",
        events: EventWriter | None = None,
    ) -> None:
        """``append``: add to the metrics of the run being resumed; otherwise (a fresh run) any
        records of an earlier attempt in ``run_dir`` are replaced (None: no metrics file). ``unit``: what a token is (a byte,
        or a tokenizer's token), as losses are printed per unit."""
        self.total, self.tokens_per_step, self.stream = total_steps, tokens_per_step, stream
        self.unit = unit
        self.log_every, self.events = log_every, events
        self.tty = stream.isatty()
        # Off a terminal the bar is disabled and writes nothing: logs get the plain lines alone.
        self.bar = tqdm(
            total=total_steps, file=stream, disable=not self.tty, ascii="-#", bar_format=_BAR_FORMAT
        )
        self.metrics = (
            None if run_dir is None else (run_dir / METRICS_FILE).open("a" if append else "w")
        )
        self.start = time.perf_counter()
        self.step_times: list[float] = []  # seconds of each step after the first
        self.first_step = True

    def _append(self, record: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def tokens_per_s(self, window: int = 20) -> float:
        """Tokens per second over the last ``window`` timed steps (NaN before any)."""
        recent = self.step_times[-window:]
        return self.tokens_per_step * len(recent) / sum(recent) if recent else math.nan

    def eta(self, step: int) -> float:
        recent = self.step_times[-20:]
        return (self.total - step) * sum(recent) / len(recent) if recent else math.nan

    def _rate(self, step: int) -> str:
        """Throughput and ETA from the timed steps; before any (the first step of a run or a resume
        compiles, so it is not timed), that the step included the compile."""
        if not self.step_times:
            return "first step (compiled): no rate yet"
        return f"{self.tokens_per_s():,.0f} tok/s  ETA {format_seconds(self.eta(step))}"

    def train(self, step: int, metrics: dict[str, float], step_s: float) -> None:
        """Record the update that brought the run to ``step``; it took ``step_s`` seconds."""
        if not self.first_step:
            self.step_times.append(step_s)
        self.first_step = False
        record = {"kind": "train", "step": step, **metrics, "step_s": step_s}
        record["tokens_per_s"] = self.tokens_per_step / step_s
        self._append({**record, "elapsed_s": time.perf_counter() - self.start})
        if self.events is not None:
            scalars = {f"train/{k}": v for k, v in record.items() if k not in ("kind", "step")}
            self.events.scalars(step, scalars)
        if self.tty:
            self._draw(step, metrics["loss"])
        elif step % self.log_every == 0 or step == self.total:
            self.line(
                f"step {step}/{self.total}  loss {metrics['loss']:.4f}  "
                f"grad_norm {metrics['grad_norm']:.3f}  lr {metrics['lr']:.2e}  {self._rate(step)}"
            )

    def val(self, step: int, val_loss: float) -> None:
        self._append(
            {
                "kind": "val",
                "step": step,
                "val_loss": val_loss,
                "elapsed_s": time.perf_counter() - self.start,
            }
        )
        if self.events is not None:
            self.events.scalars(step, {"val/loss": val_loss})
        self.line(f"step {step}/{self.total}  validation loss {val_loss:.4f} nats/{self.unit}")

    def line(self, text: str) -> None:
        """A message on its own line (above the bar on a terminal)."""
        self.bar.write(text, file=self.stream)
        self.stream.flush()

    def _draw(self, step: int, loss: float) -> None:
        """The bar at ``step``; tqdm redraws it at most ten times a second."""
        self.bar.set_postfix_str(f"loss {loss:.4f}  {self._rate(step)}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.events is not None:
            self.events.close()
