"""Where a compiled phase's time goes, op by op (``jaxllm profile``).

A few calls of the phase run back to back under JAX's profiler, each fed the state or cache
the last one returned (the steady state of a training or decoding loop). Each instant of the
trace's wall time is shared evenly among the ops running then (``shared_wall``), so ops that two
CPU threads run side by side are not counted twice, and the shares of a call add up to the time
some op was running. On a CPU the ops are XLA's thunks on the host's threads (fusions, YNNPACK's
library calls as ``ynn_fusion``, XLA's own product loops as ``dot``); on a GPU, the device's
kernels, each under the instruction whose thunk launched it (cuBLAS's and cuDNN's kernels too).
Each op comes with its definition in the compiled module (``hlo_ops``), the bytes of its operands
and result (``op_bytes``) and the FLOPs of its matrix products (``op_flops``), read off the module.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import phases, train
from jaxllm.config import ModelConfig
from jaxllm.errors import RunError, check_directory, positive_int
from jaxllm.xla_hlo import (
    fused_attention_flops,
    gemm_flops,
    product_flops,
    shape_bytes,
    workspaces_as_empty,
)

Span = tuple[float, float, str]  # start, end (µs), op name


@dataclasses.dataclass(frozen=True)
class OpTime:
    name: str  # the HLO instruction (a GPU kernel's name where its event names none)
    kind: str  # the name without its number (``.12``, or a GPU kernel's ``_12``)
    seconds: float  # its share of the wall time, per call
    hlo: str  # its definition in the compiled module (``hlo_ops``), or ""
    nbytes: int  # per call, its operands' and result's bytes (``op_bytes``) each run; 0 if unknown
    flops: int  # per call, its matrix products' FLOPs (``op_flops``) each run; 0 for none
    part: str  # the part of the model it computes (``part``)
    backward: bool  # whether its name puts it in the backward pass (False where none is known)

    @property
    def bytes_per_s(self) -> float:
        """``nbytes`` over its share of the wall time: its bandwidth, if it read each once."""
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def flops_per_s(self) -> float:
        """``flops`` over its share of the wall time."""
        return self.flops / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class OpProfile:
    phase: str
    batch: int
    seq: int
    calls: int
    span_s: float  # first op's start to the last op's end, per call, under the profiler
    wall_s: float  # seconds a call of the same chain without the profiler
    ops: list[OpTime]  # most time first

    @property
    def op_s(self) -> float:
        """Seconds per call that some op was running."""
        return sum(op.seconds for op in self.ops)

    def products(self) -> tuple[float, int, int]:
        """Seconds, FLOPs and bytes (``OpTime.nbytes``) a call of the ops that run matrix products
        (``OpTime.flops``)."""
        ops = [op for op in self.ops if op.flops]
        return (
            sum(op.seconds for op in ops),
            sum(op.flops for op in ops),
            sum(op.nbytes for op in ops),
        )

    def to_json(self, top: int) -> dict[str, Any]:
        """``jaxllm profile --json``: the fields, the ``top`` ops, and the totals."""
        seconds, flops, nbytes = self.products()
        return dataclasses.asdict(self) | {
            "ops": [dataclasses.asdict(op) for op in self.ops[:top]],
            "op_s": self.op_s,
            "by_kind": self.by_kind(),
            "by_part": {
                k: {"forward_s": f, "backward_s": b} for k, (f, b) in self.by_part().items()
            },
            "product_s": seconds,
            "product_flops": flops,
            "product_bytes": nbytes,
        }

    def by_part(self) -> dict[str, tuple[float, float]]:
        """Seconds per call by part of the model (``PARTS``): forward and backward, most first."""
        parts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for op in self.ops:
            parts[op.part][op.backward] += op.seconds
        return {k: (f, b) for k, (f, b) in sorted(parts.items(), key=lambda kv: -sum(kv[1]))}

    def by_kind(self) -> dict[str, float]:
        """Seconds per call by op kind, most first."""
        kinds: dict[str, float] = defaultdict(float)
        for op in self.ops:
            kinds[op.kind] += op.seconds
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def shared_wall(spans: list[Span]) -> dict[str, float]:
    """Each op's share of wall time (µs) from its spans: every instant divided evenly among the
    spans open then (two spans of one name open at once count twice)."""
    edges = sorted([(a, 1, n) for a, _, n in spans] + [(b, -1, n) for _, b, n in spans])
    share: dict[str, float] = defaultdict(float)
    running: dict[str, int] = defaultdict(int)
    last = 0.0
    for t, step, name in edges:
        if running:
            width = (t - last) / sum(running.values())
            for n, count in running.items():
                share[n] += width * count
        last = t
        running[name] += step
        if running[name] == 0:
            del running[name]
    return dict(share)


def op_spans(events: list[dict[str, Any]], module: str, ops: set[str], host: bool) -> list[Span]:
    """The ops of ``module`` among a Perfetto trace's complete events, each named after the
    instruction that its ``hlo_op`` argument gives where its ``hlo_module`` is ``module`` (XLA's
    thunks on a CPU's threads; on a GPU, the kernels a thunk launched, a library's too); events of
    other modules are left out (the chain's own small programs). On a CPU (``host``) only the
    module's instructions ``ops``; on a GPU a device's events, one that carries no instruction under
    the instruction its kernel is named after (XLA names a fusion's kernel after it, "." as "_"),
    else under the kernel's own name."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    kernels = {re.sub(r"\W", "_", op): op for op in ops}
    spans = []
    for e in events:
        args = e.get("args", {})
        if e.get("ph") != "X" or args.get("hlo_module", module) != module:
            continue
        op = args.get("hlo_op") or (e["name"] if host else kernels.get(e["name"], e["name"]))
        keep = op in ops if host else "/device:" in names.get(e["pid"], "")
        if keep:
            spans.append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), op))
    return spans


# The parts of a step, by the names of the JAX operations its ops came from, transformations
# (``jvp(...)``, ``transpose(...)``) stripped: jaxllm's named scopes (``optimizer``, ``head_loss``,
# ``head``, ``kv_cache``) and the Flax modules' names. The first that matches names the part.
PARTS = (
    ("optimizer", r"(^|/)optimizer/"),
    ("head/loss", r"(^|/)head(_loss)?/"),
    ("KV cache writes", r"(^|/)kv_cache/"),
    ("embeddings", r"(^|/)(pos_)?embed/"),
    ("norms", r"_norm/"),
    ("attention projections", r"/attn/(qkv|[qkvo])/"),
    ("attention", r"/attn/|^cache\.[kv]\["),
    ("MLP", r"/mlp/"),
    ("layers' slices and stacks", r"Transformer\._layers/"),
)


def part(source: str) -> tuple[str, bool]:
    """The part of the model (``PARTS``; ``other`` where none matches or no name is known) that the
    op named ``source`` (its op_name, or a parameter's path: ``params['block_0']['mlp']...``,
    ``cache.k[0]``) computes, and whether in the backward pass (a transposed operation's)."""
    scopes = re.sub(r"[\w.]+\(", "", source).replace(")", "")
    scopes = re.sub(r"\['|'\]\['|'\]", "/", scopes)
    name = next((name for name, pattern in PARTS if re.search(pattern, scopes)), "other")
    return name, "transpose(" in source


# Ops whose time is that of the ops they run (a loop's body, a branch, a call): left out.
CONTAINERS = frozenset({"while", "conditional", "call"})


@dataclasses.dataclass(frozen=True)
class HloOp:
    opcode: str
    text: str  # shape, opcode and operands, then the JAX operation it came from
    nbytes: int  # its result's bytes (a tuple's, summed)
    operands: tuple[str, ...]  # the instructions it takes
    dims: tuple[int, ...]  # its result's dimensions (an array's; () for a tuple or scalar)
    computation: str  # the computation it is in
    calls: str  # a fusion's computation, or ""
    contracting: tuple[int, ...]  # a dot's contracting dimensions of its left operand
    library_flops: int  # a library call's products (cuBLAS GEMM, cuDNN attention), else 0
    source: str  # the JAX operation it came from (its metadata's op_name), or ""


def op_bytes(hlo: dict[str, HloOp], name: str) -> int:
    """Bytes an op reads and writes if it touches each operand and its result once: their sizes,
    each operand counted once. An upper bound for an op that reads part of an operand (a slice of
    stacked weights), exact for one that streams them."""
    op = hlo[name]
    return op.nbytes + sum(hlo[o].nbytes for o in set(op.operands) if o in hlo)


def _operands(rest: str) -> str:
    """The text up to the parenthesis closing the one before ``rest``."""
    depth = 0
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return rest[:i]
    return rest


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d) if text else ()


def hlo_ops(text: str) -> dict[str, HloOp]:
    """Instruction name -> its opcode, a short definition (the result's shape with layouts dropped,
    opcode and operands, then ``op_name`` of its metadata) and what ``op_flops`` needs, from a
    compiled module's text."""
    ops: dict[str, HloOp] = {}
    computation = ""
    for line in text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            computation = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$", line)
        if m and m.group(1) not in ops:
            shape = re.sub(r"\{[^}]*\}", "", m.group(2))
            source = re.search(r'op_name="([^"]*)"', line)
            origin = f" <- ...{source.group(1)[-80:]}" if source else ""
            operands = _operands(m.group(4))
            array = re.fullmatch(r"\w+\[([\d,]*)\]", shape)
            calls = re.search(r"calls=%([\w.\-]+)", line)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            names = tuple(re.findall(r"%([\w.\-]+)", operands))
            lhs = ops[names[0]].dims if names and names[0] in ops else ()
            ops[m.group(1)] = HloOp(
                m.group(3),
                f"{shape} {m.group(3)}({operands}){origin}",
                shape_bytes(shape),
                names,
                _ints(array.group(1)) if array else (),
                computation,
                calls.group(1) if calls else "",
                _ints(contracting.group(1)) if contracting else (),
                gemm_flops(line, lhs) + fused_attention_flops(line),
                source.group(1).replace("\\'", "'") if source else "",
            )
    return ops


def module_name(text: str) -> str:
    """The name of a compiled module (``HloModule jit_train_step, ...``), as its ops' trace
    events carry it (``hlo_module``)."""
    m = re.match(r"HloModule ([\w.\-]+)", text)
    if m is None:
        raise ValueError(f"not an HLO module's text: {text[:80]!r}")
    return m.group(1)


def _dot_flops(hlo: dict[str, HloOp], op: HloOp) -> int:
    """2 x a dot's result elements x its contracted size (0 where its left operand is unknown)."""
    if not op.operands or op.operands[0] not in hlo:
        return 0
    return product_flops(op.dims, hlo[op.operands[0]].dims, op.contracting)


def op_flops(hlo: dict[str, HloOp]) -> dict[str, int]:
    """The FLOPs of the ops that run matrix products (2 per multiply-add): a dot's own, a library
    call's (a GPU's cuBLAS GEMMs and cuDNN's fused attention, ``HloOp.library_flops``), a fusion's
    those of its computation. Other ops are left out."""
    flops = {name: _dot_flops(hlo, op) for name, op in hlo.items() if op.opcode == "dot"}
    flops |= {name: op.library_flops for name, op in hlo.items() if op.library_flops}
    inside: dict[str, int] = defaultdict(int)  # computation -> its dots' FLOPs
    for name, count in flops.items():
        inside[hlo[name].computation] += count
    for name, op in hlo.items():
        if op.opcode == "fusion" and inside.get(op.calls):
            flops[name] = inside[op.calls]
    return flops


def _chain(compiled: Any, phase: str, first: tuple, calls: int) -> tuple[Any, tuple]:
    """``calls`` calls dispatched back to back, each fed what the last returned in place of the
    argument it donates: the train state, or the cache (its index set back to the first call's, so
    that every decode step completes the same context). Returns the last call's outputs and the
    arguments of a next call."""
    index = None if phase == "train" else int(first[1].index)
    args = first
    for _ in range(calls):
        out = compiled(*args)
        if index is None:
            args = (out[0], *args[1:])
        else:
            args = (args[0], out[1].replace(index=jnp.int32(index)), *args[2:])
    return out, args


def _traced(
    compiled: Any, phase: str, first: tuple, calls: int, trace_dir: Path | None
) -> list[dict[str, Any]]:
    """The trace events of ``_chain``; the trace is kept under ``trace_dir`` where one is given
    (TensorBoard's profile plugin and ui.perfetto.dev open it), else in a temporary folder."""
    with tempfile.TemporaryDirectory() as temporary:
        d = Path(trace_dir or temporary)
        with jax.profiler.trace(str(d), create_perfetto_trace=True):
            jax.block_until_ready(_chain(compiled, phase, first, calls)[0])
        newest = max(d.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
        with gzip.open(newest) as f:
            return json.load(f)["traceEvents"]


def profile(program: phases.Program, calls: int, trace_dir: Path | None = None) -> OpProfile:
    """``calls`` chained calls of ``program`` (``_chain``) under the profiler, its ops' shares of
    the wall time per call. Before them, in the same chain: as many calls untimed (the first calls
    of a fresh state fault its temporaries' pages in: a gpt2 train step's loss pass took 5x its
    steady time in a profile of three calls that began cold), then as many timed without the
    profiler, which adds to each op's time (gpt2's bf16 decode step, about 540 ops: 6.29 -> 6.66
    ms at B=1, 14.76 -> 15.27 ms at B=8; 2-core Zen 5 VM). ``trace_dir``: where to keep the trace."""
    positive_int("calls", calls)
    compiled = program.jitted.lower(*program.abstract_args).compile()
    out, first = _chain(compiled, program.phase, program.make_args(jax.random.key(0))(), calls)
    jax.block_until_ready(out)
    start = time.perf_counter()
    out, first = _chain(compiled, program.phase, first, calls)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - start) / calls
    text = compiled.as_text()
    hlo = hlo_ops(workspaces_as_empty(text))  # a library's scratch is no traffic of the op's
    leaves = {name for name, op in hlo.items() if op.opcode not in CONTAINERS}
    on_host = jax.default_backend() == "cpu"
    events = _traced(compiled, program.phase, first, calls, trace_dir)
    module = module_name(text)
    spans = op_spans(events, module, leaves, on_host)
    if not spans:
        raise RunError(f"the profiler's trace holds no op of {module}")
    span = max(b for _, b, _ in spans) - min(a for a, _, _ in spans)
    span_s = span / 1e6 / calls
    ops = op_times(hlo, spans, calls)
    return OpProfile(program.phase, program.batch, program.seq, calls, span_s, wall, ops)


def profile_phase(
    config: ModelConfig,
    phase: str,
    batch: int,
    seq: int,
    calls: int,
    overrides: tuple[str, ...] | list[str] = (),
    trace_dir: Path | None = None,
) -> OpProfile:
    """``profile`` of the ``phase`` program that ``analyze`` compiles: training as ``jaxllm
    train`` compiles it (``train.training_config``, given the run's ``overrides``), serving as
    ``jaxllm generate`` serves it (``phases.build``). Sizes, and ``trace_dir`` (a folder or a new
    path), are checked before anything is traced."""
    if trace_dir is not None:
        check_directory("trace_dir", trace_dir)
    if phase == "train":
        config = train.training_config(config, overrides)
    return profile(phases.build(config, phase, batch, seq), calls, trace_dir)


def _source(hlo: dict[str, HloOp], op: HloOp, depth: int = 3) -> str:
    """An op's JAX name; for one that XLA left unnamed (a CPU's one-row products, its products over
    the KV cache), that of the first parameter it reads (a weight's or the cache's path: its own
    or a bitcast's of it), directly or through unnamed ops up to ``depth`` deep."""
    if op.source or depth == 0:
        return op.source
    for operand in (hlo[o] for o in op.operands if o in hlo):
        if operand.opcode in ("parameter", "bitcast") and operand.source:
            return operand.source
        if not operand.source and (found := _source(hlo, operand, depth - 1)):
            return found
    return ""


def op_times(hlo: dict[str, HloOp], spans: list[Span], calls: int) -> list[OpTime]:
    """The ops of ``spans`` (``calls`` calls' worth), most time first: each one's share of the wall
    time, bytes and FLOPs per call. An op inside a loop runs several times a call: its bytes and
    FLOPs count every run (its spans a call). A GPU names a fusion's kernel after the instruction
    with ``_`` for ``.`` (``loop_add_fusion_3`` runs ``loop_add_fusion.3``)."""
    flops = op_flops(hlo)
    kernels = {name.replace(".", "_"): name for name in hlo}
    runs = Counter(name for _, _, name in spans)
    ops = []
    for name, us in sorted(shared_wall(spans).items(), key=lambda kv: -kv[1]):
        per_call = runs[name] / calls
        instruction = name if name in hlo else kernels.get(name, "")
        op = hlo.get(instruction)
        ops.append(
            OpTime(
                name,
                re.sub(r"[._]\d+$", "", name),
                us / 1e6 / calls,
                op.text if op else "",
                round(op_bytes(hlo, instruction) * per_call) if op else 0,
                round(flops.get(instruction, 0) * per_call),
                *part(_source(hlo, op) if op else ""),
            )
        )
    return ops


def _parts_table(result: OpProfile) -> list[str]:
    """The time a call by part of the model (``OpProfile.by_part``), forward and backward for a
    train step."""
    op_s, train = result.op_s, result.phase == "train"
    head = (
        "| part | forward ms | backward ms | share |" if train else "| part | ms a call | share |"
    )
    lines = [head, "|---|---|---|---|" if train else "|---|---|---|"]
    for name, (forward, backward) in result.by_part().items():
        times = f"{forward * 1e3:.3f} | {backward * 1e3:.3f}" if train else f"{forward * 1e3:.3f}"
        lines.append(f"| {name} | {times} | {(forward + backward) / op_s:.1%} |")
    if train:
        lines += [
            "",
            "An op whose pass its name does not tell (one XLA left unnamed) counts as forward.",
        ]
    return lines


def table(result: OpProfile, top: int) -> list[str]:
    """Lines: the totals and the matrix products' (time, GFLOP, GFLOP/s), the time by part of the
    model, the ``top`` op kinds, then the ``top`` ops with their bytes and FLOPs a call, the rates
    those make in the op's time, and their HLO definitions."""
    op_s = result.op_s
    lines = [
        f"{result.phase} B={result.batch} seq={result.seq}, {result.calls} calls: "
        f"{op_s * 1e3:.3f} ms of op time a call in a span of {result.span_s * 1e3:.3f} ms "
        f"under the profiler; {result.wall_s * 1e3:.3f} ms a call without it",
    ]
    seconds, flops, _ = result.products()
    if flops:
        lines.append(
            f"matrix products: {seconds * 1e3:.3f} ms a call ({seconds / op_s:.0%} of the op time), "
            f"{flops / 1e9:.3f} GFLOP, {flops / seconds / 1e9:.1f} GFLOP/s"
        )
    lines += ["", *_parts_table(result), "", "| op kind | ms a call | share |", "|---|---|---|"]
    for kind, s in list(result.by_kind().items())[:top]:
        lines.append(f"| {kind} | {s * 1e3:.3f} | {s / op_s:.1%} |")
    lines += ["", "| op | ms a call | MB | GB/s | GFLOP/s | HLO |", "|---|---|---|---|---|---|"]
    for op in result.ops[:top]:
        hlo = f"`{op.hlo[:200]}`".replace("|", "\\|") if op.hlo else ""
        rate = f"{op.nbytes / 1e6:.2f} | {op.bytes_per_s / 1e9:.1f}" if op.nbytes else " | "
        compute = f"{op.flops_per_s / 1e9:.0f}" if op.flops else ""
        lines.append(f"| {op.name} | {op.seconds * 1e3:.3f} | {rate} | {compute} | {hlo} |")
    return lines
