"""``jaxllm bench``: the standard grid of measurements — train, prefill, and decode at B in
{1, 8, 32, 128} — for some presets, one ``jaxllm.measure.PhaseResult`` per row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from jaxllm.config import get_preset
from jaxllm.measure import Compiled, PhaseResult, check_fits, compile_phase, phase_result

DECODE_BATCHES = (1, 8, 32, 128)


def grid(preset: str, batches: Sequence[int], quick: bool) -> list[tuple[str, int, int]]:
    """(phase, batch, seq) rows of the bench for one preset: shapes that run in seconds on a CPU in
    quick mode, the documented shapes otherwise."""
    config = get_preset(preset)
    seq = min(config.max_len, 64 if quick else 256)
    context = min(config.max_len, 128 if quick else 1024)
    rows = [("train", 1 if quick else 4, seq), ("prefill", 1, context)]
    return rows + [("decode", b, context) for b in batches]


def compile_rows(
    presets: Sequence[str], batches: Sequence[int] = DECODE_BATCHES, quick: bool = False
) -> list[tuple[str, Compiled]]:
    """Every row of ``grid`` for each preset compiled, each checked to fit in memory before any is
    measured (``measure.check_fits``)."""
    rows = []
    for preset in presets:
        config = get_preset(preset)
        for phase, batch, seq in grid(preset, batches, quick):
            compiled = compile_phase(config, phase, batch, seq)
            check_fits(compiled, "lower --batches" if phase == "decode" else "drop that preset")
            rows.append((preset, compiled))
    return rows


def bench(rows: Sequence[tuple[str, Compiled]], quick: bool = False) -> Iterator[PhaseResult]:
    """Measures each row of ``compile_rows``."""
    for preset, compiled in rows:
        yield phase_result(compiled, measure=True, quick=quick, preset=preset)
