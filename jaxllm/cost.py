"""What XLA itself reports for a compiled phase: FLOPs, bytes accessed and memory, loop-correct.

``analyze(jitted, *abstract_args)`` lowers and compiles ahead of time (with the donation the jitted
function was built with, so ``alias_bytes`` and ``temp_bytes`` are those of the real program) and
returns an ``XlaCost``.

Every figure is XLA's own cost model applied to the optimized HLO, the same way on every backend
(``jaxllm.xla_hlo``: XLA's generic model, which gives a CPU program's ``cost_analysis()`` exactly,
with a GPU's cuBLAS GEMMs costed as the dots and epilogues they compute and cuDNN's fused attention
counted from its shapes; a GPU's own ``cost_analysis()`` leaves both out), corrected for loops:

XLA's cost analysis counts the body of a while loop ONCE (a 10-step scan reports one step; the
gradient of 10 scanned layers reports 3 layer-forwards). The optimized HLO marks static loops with
``known_trip_count`` in the while op's backend_config, so each loop body is costed as a computation
of its own and scaled by its trip count:

    corrected(c) = raw(c) + sum over the while ops w in c of
                   n_w * corrected(body_w) - raw(body_w) + n_w * raw(cond_w)
                 + sum over other call sites of c that hold a loop (a conditional's branches, a
                   call, a GPU command buffer) of corrected(callee) - raw(callee)

(the condition runs n + 1 times and is counted once; a conditional is charged its costliest branch,
as XLA does). The same code runs on every backend. A loop without a known trip count (a generation
loop that stops on end-of-text), or bodies this jaxlib cannot cost, leave the figures as XLA counted
them, with ``loop_corrected`` False and ``loop_note`` saying why; a program this jaxlib cannot
cost at all keeps XLA's own ``cost_analysis()``, flagged the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Mapping
from typing import Any

from jaxllm.xla_hlo import (
    HloCostError,
    computation_costs,
    costable,
    custom_calls,
    fused_attention_flops,
)

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
    loop_note: str  # why the figures are not loop-corrected ("" when they are)
    loops: tuple[int | None, ...]  # trip count of each while loop in the program (None: unknown)
    raw_flops: float  # as the backend's cost_analysis() reported them (each loop body once; a GPU's
    # leaves out cuBLAS and cuDNN calls, and reports -1 for a program of them alone)
    raw_bytes_accessed: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalize_costs(costs: Any) -> Costs:
    """``cost_analysis()`` output -> {flops, transcendentals, bytes accessed}.

    Missing keys mean zero (CPU omits ``transcendentals`` when there are none); a negative value
    (XLA's generic model reports -1 for a custom call it cannot see into) means "not computed" and
    raises, rather than be summed as a count.
    """
    if not isinstance(costs, Mapping):
        raise ValueError(f"XLA cost analysis returned {type(costs).__name__}, expected a dict")
    out = {key: float(costs.get(key, 0.0)) for key in COST_KEYS}
    bad = [key for key, value in out.items() if value < 0 or not math.isfinite(value)]
    if bad:
        raise ValueError(f"XLA cost analysis gave no valid {bad[0]!r}: {costs.get(bad[0])!r}")
    return out


@dataclasses.dataclass(frozen=True)
class _Site:
    """One instruction of a computation that calls other computations (fusions are left out: no
    loop can sit inside a fusion)."""

    opcode: str  # while, conditional, call, async-start, ...
    callees: tuple[str, ...]  # while: (condition, body)
    trip_count: int | None = None  # while only: known_trip_count, None if unknown


_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(")
_OPCODE = re.compile(r" = .*?\b([a-z][a-z0-9\-]*)\(")
_ONE = re.compile(
    r"\b(calls|to_apply|condition|body|true_computation|false_computation)=%?([\w.\-]+)"
)
_MANY = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _site(line: str) -> _Site | None:
    """The call site on one HLO instruction line, None if it calls nothing (or is a fusion)."""
    named = dict(_ONE.findall(line))
    many = [n.strip().lstrip("%") for _, group in _MANY.findall(line) for n in group.split(",")]
    opcode = _OPCODE.search(line)
    if opcode is None or opcode.group(1) == "fusion" or not (named or many):
        return None
    if opcode.group(1) == "while":
        if "condition" not in named or "body" not in named:
            raise ValueError(f"cannot parse HLO while op: {line.strip()[:200]}")
        trip = _TRIP.search(line)
        count = int(trip.group(1)) if trip else None
        return _Site("while", (named["condition"], named["body"]), count)
    return _Site(opcode.group(1), tuple(named.values()) + tuple(n for n in many if n))


def call_graph(hlo_text: str) -> tuple[str, dict[str, list[_Site]]]:
    """The entry computation's name and the call sites (other than fusions) of every computation
    of an HLO module text."""
    entry, sites, _ = _parse(hlo_text)
    return entry, sites


def _parse(hlo_text: str) -> tuple[str, dict[str, list[_Site]], dict[str, int]]:
    """``call_graph``, and the FLOPs of the fused-attention calls in each computation's own body."""
    entry, current, sites, attention = "", "", {}, {}
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            entry = current if header.group(1) else entry
            sites[current], attention[current] = [], 0
        elif current and line.startswith("  "):
            site = _site(line)
            if site is not None:
                sites[current].append(site)
            attention[current] += fused_attention_flops(line)
    return entry, sites, attention


class _LoopCorrector:
    """Costs computations of one optimized HLO module by XLA's own cost model and scales loop
    bodies by their trip counts, wherever in the call graph the loops sit (the entry, inside other
    loops, or inside called computations such as a conditional's branches or a GPU command buffer)."""

    def __init__(self, hlo_text: str) -> None:
        self.text = hlo_text
        self.entry, self.sites, self._own_attention = _parse(self.text)
        self._raw: dict[str, Costs] = {}
        self._loops: dict[str, bool] = {}
        self.unknown = 0  # while ops without a trip count met on the way

    @functools.cached_property
    def _costable(self) -> str:
        """The module rewritten for XLA's generic model, once (``xla_hlo.costable``)."""
        return costable(self.text)

    def whiles(self) -> list[_Site]:
        return [s for sites in self.sites.values() for s in sites if s.opcode == "while"]

    def has_loop(self, computation: str) -> bool:
        """Whether a while op sits in ``computation`` or anything it calls."""
        if computation not in self._loops:
            self._loops[computation] = False  # guards against cycles while recursing
            sites = self.sites.get(computation, [])
            self._loops[computation] = any(
                s.opcode == "while" or any(self.has_loop(c) for c in s.callees) for s in sites
            )
        return self._loops[computation]

    def raw(self, computation: str) -> Costs:
        """Costs of ``computation`` as XLA's model counts them: each loop body once."""
        if computation not in self._raw:
            try:
                costs = normalize_costs(computation_costs(self._costable, computation))
            except ValueError as err:
                targets = ", ".join(sorted(custom_calls(self.text))) or "none"
                raise ValueError(f"{err} (custom calls in the program: {targets})") from err
            costs["flops"] += self.attention(computation)
            self._raw[computation] = costs
        return self._raw[computation]

    def attention(self, computation: str) -> float:
        """Fused-attention FLOPs of ``computation`` and what it calls, each called computation
        counted once and a conditional's costliest branch, as XLA's model counts the rest."""
        total = float(self._own_attention.get(computation, 0))
        for site in self.sites.get(computation, []):
            parts = [self.attention(c) for c in site.callees]
            total += max(parts) if site.opcode == "conditional" else sum(parts)
        return total

    def corrected(self, computation: str) -> Costs:
        """Loop-corrected costs of ``computation``: its raw costs plus, for each call site holding a
        loop, the difference between the corrected and the raw cost of what it calls."""
        total = dict(self.raw(computation))
        for site in self.sites.get(computation, []):
            if not any(self.has_loop(c) for c in site.callees) and site.opcode != "while":
                continue
            delta = self._delta(site)
            for key in COST_KEYS:
                total[key] += delta[key]
        return total

    def _delta(self, site: _Site) -> Costs:
        """Corrected minus raw cost of one call site (XLA counts each called computation once)."""
        if site.opcode == "while":
            cond, body = site.callees
            if site.trip_count is None:
                self.unknown += 1
                return dict.fromkeys(COST_KEYS, 0.0)
            n, fixed, raw = site.trip_count, self.corrected(body), self.raw(body)
            # The body runs n times, the condition n + 1 times; XLA counted each once.
            return {k: n * fixed[k] - raw[k] + n * self.raw(cond)[k] for k in COST_KEYS}
        fixed = [self.corrected(c) for c in site.callees]
        raw = [self.raw(c) for c in site.callees]
        if site.opcode == "conditional":  # XLA charges the costliest branch
            return {k: max(f[k] for f in fixed) - max(r[k] for r in raw) for k in COST_KEYS}
        return {k: sum(f[k] - r[k] for f, r in zip(fixed, raw, strict=True)) for k in COST_KEYS}


def loop_corrected_costs(compiled: Any) -> tuple[Costs, Costs, str, tuple[int | None, ...]]:
    """(corrected, raw, note, trip counts) for a ``jax.stages.Compiled``: ``raw`` is the backend's
    own ``cost_analysis()`` as it reports it (-1: uncounted); ``note`` is "" when every loop was
    corrected, else why not."""
    costs = compiled.cost_analysis()  # a GPU's reports -1 for a program of custom calls only
    raw = {key: float(costs.get(key, 0.0)) for key in COST_KEYS}
    corrected, note, loops = correct_loops(compiled.as_text(), raw)
    return corrected, raw, note, loops


def correct_loops(hlo_text: str, raw: Costs) -> tuple[Costs, str, tuple[int | None, ...]]:
    """(corrected costs, note, trip counts) of an optimized HLO module, costed the same way on
    every backend; ``raw`` (the backend's own figures) is returned, flagged, if it cannot be."""
    corrector = _LoopCorrector(hlo_text)
    loops = tuple(w.trip_count for w in corrector.whiles())
    try:
        corrected = corrector.corrected(corrector.entry)
    except (ValueError, HloCostError) as err:  # flagged, never under-counted
        return raw, f"the program could not be costed, XLA's own figures kept: {err}", loops
    if corrector.unknown:
        return (
            corrected,
            f"{corrector.unknown} loop(s) without a known trip count are counted once",
            loops,
        )
    return corrected, "", loops


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
    return analyze_compiled(*compile_timed(jitted, *args))


def analyze_compiled(compiled: Any, compile_seconds: float) -> XlaCost:
    """``analyze`` of an already compiled program (so that the same executable can be timed)."""
    corrected, raw, note, loops = loop_corrected_costs(compiled)
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
        compile_seconds=compile_seconds,
        loop_corrected=not note,
        loop_note=note,
        loops=loops,
        raw_flops=raw["flops"],
        raw_bytes_accessed=raw["bytes accessed"],
    )
