"""What XLA itself reports for a compiled phase: FLOPs, bytes accessed and memory, loop-correct.

``analyze(jitted, *abstract_args)`` lowers and compiles ahead of time (with the donation the jitted
function was built with, so ``alias_bytes`` and ``temp_bytes`` are those of the real program) and
returns an ``XlaCost``.

XLA's cost analysis counts the body of a while loop ONCE (XLA_NOTES.md: a 10-step scan reports one
step; the gradient of 10 scanned layers reports 3 layer-forwards). The optimized HLO marks static loops
with ``known_trip_count`` in the while op's backend_config, so each loop body is cut out of the HLO
text as a module of its own, costed by the same XLA cost model, and scaled by its trip count,
recursively for nested loops:

    corrected(c) = raw(c) + sum over the while ops w in c of
                   n_w * corrected(body_w) - raw(body_w) + n_w * raw(cond_w)

(the condition runs n + 1 times and is counted once). A loop without a known trip count (a generation
loop that stops on end-of-text), or one that sits where this recursion cannot reach it, cannot be
corrected: the figures then stay as XLA counted them and ``loop_corrected`` is False.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping
from typing import Any

COST_KEYS = ("flops", "transcendentals", "bytes accessed")
Costs = dict[str, float]


@dataclasses.dataclass(frozen=True)
class XlaCost:
    """XLA's figures for one compiled program (FLOPs and bytes loop-corrected where possible)."""

    flops: float  # floating-point operations (exp, tanh, ... are in transcendentals)
    transcendentals: float
    bytes_accessed: float  # XLA's compulsory-traffic model over the optimized HLO, bytes
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # argument buffers reused for outputs (donation)
    temp_bytes: int
    footprint_bytes: int  # argument + output - alias + temp
    compile_seconds: float
    loop_corrected: bool  # False: a loop's trip count is unknown, its body is counted once
    loops: tuple[int | None, ...]  # trip count of each while loop in the program (None: unknown)
    raw_flops: float  # as XLA reported them, each loop body counted once
    raw_bytes_accessed: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalize_costs(costs: Any) -> Costs:
    """``cost_analysis()`` output -> {flops, transcendentals, bytes accessed}.

    Older jax returns a list holding one dict; missing keys mean zero (CPU omits ``transcendentals``
    when there are none); a negative value (older GPU backends report -1) means "not computed" and
    raises, rather than be summed as a count.
    """
    if isinstance(costs, list | tuple):
        costs = costs[0] if costs else {}
    if not isinstance(costs, Mapping):
        raise ValueError(f"XLA cost analysis returned {type(costs).__name__}, expected a dict")
    out = {key: float(costs.get(key, 0.0)) for key in COST_KEYS}
    bad = [key for key, value in out.items() if value < 0 or not math.isfinite(value)]
    if bad:
        raise ValueError(f"XLA cost analysis gave no valid {bad[0]!r}: {costs.get(bad[0])!r}")
    return out


@dataclasses.dataclass(frozen=True)
class _While:
    condition: str
    body: str
    trip_count: int | None


_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _while_ops(hlo_text: str) -> tuple[str, dict[str, list[_While]]]:
    """The entry computation's name and the while ops of every computation of an HLO module text."""
    entry, current, found = "", "", {}
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            entry = current if header.group(1) else entry
            found[current] = []
        elif current and re.search(r"\swhile\(", line):
            cond = re.search(r"condition=%?([\w.\-]+)", line)
            body = re.search(r"body=%?([\w.\-]+)", line)
            trip = _TRIP.search(line)
            if cond is None or body is None:
                raise ValueError(f"cannot parse HLO while op: {line.strip()[:200]}")
            count = int(trip.group(1)) if trip else None
            found[current].append(_While(cond.group(1), body.group(1), count))
    return entry, found


def _module_for(hlo_text: str, computation: str) -> str:
    """The module text with ``computation`` as its entry (other computations left unreferenced)."""
    lines = hlo_text.splitlines()
    lines[0] = "HloModule loop_body"  # drop the entry layout and schedule of the original entry
    text = re.sub(r"^ENTRY ", "", "\n".join(lines), flags=re.M)
    text, n = re.subn(rf"^(%?{re.escape(computation)} \()", r"ENTRY \1", text, flags=re.M)
    if n != 1:
        raise ValueError(f"computation {computation!r} not found in the HLO module")
    return text


class _LoopCorrector:
    """Costs computations of one optimized HLO module by XLA's own cost model."""

    def __init__(self, compiled: Any) -> None:
        from jax._src.lib import xla_client

        executable = compiled.runtime_executable()
        self._client = executable.client
        self._analyse = xla_client._xla.hlo_module_cost_analysis
        self.text = executable.hlo_modules()[0].to_string()
        self.entry, self.whiles = _while_ops(self.text)
        self._raw: dict[str, Costs] = {}

    def raw(self, computation: str) -> Costs:
        if computation not in self._raw:
            import jaxlib._hlo as hlo  # pyright: ignore[reportMissingImports]

            module = hlo.hlo_module_from_text(_module_for(self.text, computation))
            self._raw[computation] = normalize_costs(self._analyse(self._client, module))
        return self._raw[computation]

    def corrected(self, computation: str, raw: Costs | None = None) -> tuple[Costs, bool]:
        """Loop-corrected costs of ``computation`` and whether every loop in it had a trip count."""
        total = dict(raw if raw is not None else self.raw(computation))
        ok = True
        for loop in self.whiles.get(computation, []):
            if loop.trip_count is None:
                ok = False
                continue
            body, body_ok = self.corrected(loop.body)
            body_raw, cond_raw = self.raw(loop.body), self.raw(loop.condition)
            n = loop.trip_count
            for key in COST_KEYS:
                total[key] += n * body[key] - body_raw[key] + n * cond_raw[key]
            ok = ok and body_ok
        return total, ok

    def reachable_loops(self) -> set[str]:
        """Computations whose loops the recursion from the entry visits."""
        seen, todo = set(), [self.entry]
        while todo:
            name = todo.pop()
            seen.add(name)
            todo += [w.body for w in self.whiles.get(name, []) if w.body not in seen]
        return seen


def loop_corrected_costs(compiled: Any) -> tuple[Costs, Costs, bool, tuple[int | None, ...]]:
    """(corrected, raw, every loop corrected, trip counts) for a ``jax.stages.Compiled``."""
    raw = normalize_costs(compiled.cost_analysis())
    corrector = _LoopCorrector(compiled)
    loops = tuple(w.trip_count for ws in corrector.whiles.values() for w in ws)
    if not loops:
        return raw, raw, True, loops
    try:
        corrected, ok = corrector.corrected(corrector.entry, raw)
    except (ValueError, RuntimeError):  # a body XLA cannot re-parse: flagged, never under-counted
        return raw, raw, False, loops
    holders = {name for name, ws in corrector.whiles.items() if ws}
    # A loop inside a called computation that is neither the entry nor a loop body is not visited.
    ok = ok and holders <= corrector.reachable_loops()
    return corrected, raw, ok, loops


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """``jitted.lower(*args).compile()`` and its wall-clock seconds (lowering included)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def analyze(jitted: Any, *args: Any) -> XlaCost:
    """XLA's loop-corrected costs and memory of ``jitted`` at ``args`` (arrays or ShapeDtypeStructs).

    ``jitted`` is a ``jax.jit``-wrapped function (or anything with ``.lower``) built with the
    ``donate_argnums`` it runs with; nothing is executed and, from ShapeDtypeStructs, nothing is
    allocated.
    """
    compiled, seconds = compile_timed(jitted, *args)
    corrected, raw, ok, loops = loop_corrected_costs(compiled)
    mem = compiled.memory_analysis()
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    return XlaCost(
        flops=corrected["flops"],
        transcendentals=corrected["transcendentals"],
        bytes_accessed=corrected["bytes accessed"],
        argument_bytes=arg,
        output_bytes=out,
        alias_bytes=alias,
        temp_bytes=temp,
        footprint_bytes=arg + out - alias + temp,
        compile_seconds=seconds,
        loop_corrected=ok,
        loops=loops,
        raw_flops=raw["flops"],
        raw_bytes_accessed=raw["bytes accessed"],
    )
