"""``jaxllm bench``: the standard grid of measurements — train, prefill, and decode at B in
{1, 8, 32, 128} — for some presets, one ``jaxllm.measure.PhaseResult`` per row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from jaxllm.config import get_preset
from jaxllm.measure import PhaseResult, analyze_phase

DECODE_BATCHES = (1, 8, 32, 128)


def grid(preset: str, batches: Sequence[int], quick: bool) -> list[tuple[str, int, int]]:
    """(phase, batch, seq) rows of the bench for one preset: shapes that run in seconds on a CPU in
    quick mode, the documented shapes otherwise."""
    config = get_preset(preset)
    seq = min(config.max_len, 64 if quick else 256)
    context = min(config.max_len, 128 if quick else 1024)
    rows = [("train", 1 if quick else 4, seq), ("prefill", 1, context)]
    return rows + [("decode", b, context) for b in batches]


def bench(
    presets: Sequence[str], batches: Sequence[int] = DECODE_BATCHES, quick: bool = False
) -> Iterator[PhaseResult]:
    """Measures every row of ``grid`` for each preset."""
    for preset in presets:
        config = get_preset(preset)
        for phase, batch, seq in grid(preset, batches, quick):
            yield analyze_phase(config, phase, batch, seq, measure=True, quick=quick, preset=preset)
