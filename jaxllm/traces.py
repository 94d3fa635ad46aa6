"""Request traces: when each request arrives, how long its prompt is, how many tokens it asks for.

``make_trace`` draws a seeded trace: Poisson arrivals at ``rate`` requests per second (exponential
gaps; ``rate=inf``: all at time 0), prompt and output lengths uniform on an inclusive range
``(lo, hi)`` or drawn from a list of values. Traces are saved and read as JSON Lines, one request per
line: ``{"arrival": seconds, "prompt_len": tokens, "output_len": tokens}``, arrivals non-decreasing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.errors import InputError, positive_int, utf8_text

Lengths = tuple[int, int] | Sequence[int]  # (lo, hi) inclusive, or the values to draw from


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the start of the run
    prompt_len: int  # tokens
    output_len: int  # max_new_tokens

    def __post_init__(self) -> None:
        if not 0 <= self.arrival <= threading.TIMEOUT_MAX:  # NaN fails too
            raise InputError(
                f"arrival must be in [0, {threading.TIMEOUT_MAX:.0f}] s (the longest wait Python's "
                f"clock takes), got {self.arrival!r}"
            )
        positive_int("prompt_len", self.prompt_len)
        positive_int("output_len", self.output_len)


def parse_lengths(text: str) -> Lengths:
    """``"16-128"`` -> (16, 128) (uniform, inclusive); ``"16,64,128"`` -> [16, 64, 128]."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            return (lo, hi)
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"lengths must be LO-HI or a comma-separated list, got {text!r}") from None


def _draw(rng: np.random.Generator, lengths: Lengths, n: int, what: str) -> list[int]:
    values = list(lengths)
    if not values or any(not isinstance(v, int) or v < 1 for v in values):
        raise InputError(f"{what} lengths must be integers >= 1, got {lengths!r}")
    if isinstance(lengths, tuple):
        lo, hi = values
        if hi < lo:
            raise InputError(f"{what} length range {lo}-{hi} is empty")
        return rng.integers(lo, hi + 1, size=n).tolist()
    return rng.choice(values, size=n).tolist()


def make_trace(
    n: int, rate: float, prompt_lens: Lengths, output_lens: Lengths, seed: int = 0
) -> list[TraceRequest]:
    """``n`` requests arriving as a Poisson process of ``rate`` per second (inf: all at once)."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"a trace needs at least one request, got {n!r}")
    if not rate > 0:
        raise InputError(
            f"the request rate must be > 0 per second (inf: all at once), got {rate!r}"
        )
    rng = np.random.default_rng(seed)
    gaps = np.zeros(n) if math.isinf(rate) else rng.exponential(1.0 / rate, size=n)
    arrivals = np.cumsum(gaps) - (0 if math.isinf(rate) else gaps[0])  # the first at time 0
    prompts = _draw(rng, prompt_lens, n, "prompt")
    outputs = _draw(rng, output_lens, n, "output")
    return [
        TraceRequest(float(a), int(p), int(o))
        for a, p, o in zip(arrivals, prompts, outputs, strict=True)
    ]


def save_trace(path: str | Path, trace: Sequence[TraceRequest]) -> None:
    """The trace as JSON Lines at ``path`` (its folder made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in trace:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def load_trace(path: str | Path) -> list[TraceRequest]:
    """The trace in a JSON Lines file; ValueError naming the line of a bad or unordered request."""
    trace = []
    for i, line in enumerate(utf8_text(str(path), Path(path).read_bytes()).splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            request = TraceRequest(
                float(fields["arrival"]), fields["prompt_len"], fields["output_len"]
            )
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{path} line {i}: not a trace request ({err})") from None
        if trace and request.arrival < trace[-1].arrival:
            raise InputError(f"{path} line {i}: arrival {request.arrival} is before the line above")
        trace.append(request)
    if not trace:
        raise InputError(f"{path} holds no requests")
    return trace
