# pyright: reportPrivateImportUsage=false
"""The one place jaxllm reaches into private XLA entry points: costing one computation of an
optimized HLO module by the backend's own cost model.

``compiled.cost_analysis()`` (public) costs a whole program; loop correction (``jaxllm.cost``) also
needs the cost of single loop bodies. jaxlib has no public API for that, so this module parses the
module text with ``jaxlib._hlo.hlo_module_from_text`` and costs it with
``xla_client._xla.hlo_module_cost_analysis`` on the CPU client, whatever the program's backend: a
GPU's PJRT C API client does not implement per-module cost analysis, and XLA's generic cost model
gives a CPU program's own ``cost_analysis()`` exactly. Neither model sees inside custom calls, and
a GPU program's GEMMs are custom calls: on an H200 (jax 0.11.2) the GPU's own ``cost_analysis()``
left out every cuBLASLt product (0.38 of gpt2-medium's prefill FLOPs were counted). So before
costing, once per module (``costable``), the libraries' scratch outputs are emptied
(``workspaces_as_empty``), each cuBLAS GEMM is rewritten into a fusion of the ``dot`` it computes
and its epilogue (``gemms_as_dots``), and each cuDNN fused-attention call into zeros of its output
shapes, its products counted here from its shapes (``fused_attention_flops``). If a jax upgrade removes either entry point, ``HloCostError``
says so; callers then report XLA's own figures, flagged.
"""

from __future__ import annotations

import collections
import importlib.metadata
import math
import re
from typing import Any

import jax


class HloCostError(RuntimeError):
    """This jaxlib lacks the private entry points, or could not parse or cost a computation."""


def element_bytes(dtype: str) -> int:
    """Bytes of one element of an HLO type: ``pred`` 1, ``token`` 0, else the width its name
    gives (``bf16`` 2, ``f8e4m3fn`` 1, ``c64`` 8)."""
    if dtype in ("pred", "token"):
        return int(dtype == "pred")
    bits = re.match(r"[a-z]+(\d+)", dtype)
    if bits is None:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return int(bits.group(1)) // 8


def shape_bytes(shape: str, min_elements: int = 1) -> int:
    """Bytes of the arrays of an HLO shape, ``bf16[8,3072]`` or a tuple of them (layouts ignored),
    counting those of at least ``min_elements`` elements; 0 for types of no storage (``token[]``)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", shape):
        elements = math.prod(int(d) for d in dims.split(",") if d)
        if elements >= min_elements:
            total += element_bytes(dtype) * elements
    return total


def _entry_points() -> tuple[Any, Any]:
    try:
        import jaxlib._hlo as hlo  # pyright: ignore[reportMissingImports]
        from jax._src.lib import xla_client

        return hlo.hlo_module_from_text, xla_client._xla.hlo_module_cost_analysis
    except (ImportError, AttributeError) as err:
        raise HloCostError(
            f"jaxlib {importlib.metadata.version('jaxlib')} has no hlo_module_from_text / "
            f"hlo_module_cost_analysis ({err}); per-loop costs are unavailable"
        ) from err


def module_with_entry(hlo_text: str, computation: str) -> str:
    """``hlo_text`` re-rooted at ``computation``: the header's entry layout is dropped (it belongs to
    the original entry) and ``computation`` becomes ENTRY; other computations stay, unreferenced."""
    lines = hlo_text.splitlines()
    lines[0] = "HloModule loop_body"
    text = re.sub(r"^ENTRY ", "", "\n".join(lines), flags=re.M)
    text, n = re.subn(rf"^(%?{re.escape(computation)} \()", r"ENTRY \1", text, flags=re.M)
    if n != 1:
        raise HloCostError(f"computation {computation!r} not found in the HLO module")
    return text


_CUSTOM_CALL = re.compile(
    r"^(\s*)(ROOT )?(%[\w.\-]+) = (\([^=]*?\)|[a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?) custom-call\("
)
_ARRAY = re.compile(r"([a-z][a-z0-9]*)(\[[\d,]*\])(\{[^}]*\})?")
_GELU_TANH = (0.044715, 0.7978845608028654)  # tanh GELU: x³'s weight and sqrt(2 / pi)


def _dims(line: str, name: str) -> str:
    found = re.search(rf'"{name}":\[([^\]]*)\]', line)
    return ",".join(
        d.strip('" ') for d in (found.group(1) if found else "").split(",") if d.strip()
    )


def _gemm_config(line: str) -> tuple[float, float, str]:
    """(alpha, beta, epilogue) of a cuBLAS GEMM's backend config."""
    alpha = re.search(r'"alpha_real":([-\d.e]+)', line)
    beta = re.search(r'"beta":([-\d.e]+)', line)
    epilogue = re.search(r'"epilogue":"(\w+)"', line)
    return (
        float(alpha.group(1)) if alpha else 1.0,
        float(beta.group(1)) if beta else 0.0,
        epilogue.group(1) if epilogue else "DEFAULT",
    )


class _Ops:
    """HLO lines of elementwise ops on arrays of one shape, named after one instruction."""

    def __init__(self, name: str, shape: str) -> None:
        self.name, self.shape, self.lines = name, shape, []
        self.dtype = _ARRAY.findall(shape)[0][0]

    def op(self, text: str) -> str:
        name = f"{self.name}.e{len(self.lines)}"
        self.lines.append(f"  {name} = {self.shape} {text}")
        return name

    def const(self, value: float) -> str:
        scalar = f"{self.name}.e{len(self.lines)}"
        self.lines.append(f"  {scalar} = {self.dtype}[] constant({value!r})")
        return self.op(f"broadcast({scalar}), dimensions={{}}")

    def gelu(self, x: str) -> str:
        """x·Φ(x) by tanh, as ``jax.nn.gelu`` writes it (the ops XLA fused into the epilogue)."""
        cube = self.op(f"multiply({self.op(f'multiply({x}, {x})')}, {x})")
        inner = self.op(f"add({x}, {self.op(f'multiply({self.const(_GELU_TANH[0])}, {cube})')})")
        t = self.op(f"tanh({self.op(f'multiply({self.const(_GELU_TANH[1])}, {inner})')})")
        half = self.op(f"multiply({self.const(0.5)}, {x})")
        return self.op(f"multiply({half}, {self.op(f'add({self.const(1.0)}, {t})')})")


def _epilogue(ops: _Ops, line: str, n_operands: int) -> None:
    """The GEMM of ``line`` on parameters p0..p{n-1} (cuBLASLt's order: A, B, C if beta is not 0,
    the bias) into ``ops``: alpha·A·B + beta·C, a bias added along the last axis, ReLU or GELU."""
    alpha, beta, epilogue = _gemm_config(line)
    if epilogue not in ("DEFAULT", "BIAS", "RELU", "BIAS_RELU", "GELU", "BIAS_GELU"):
        raise HloCostError(f"a cuBLAS GEMM with epilogue {epilogue} is not costed: {ops.name}")
    dims = ", ".join(
        f"{side}_{kind}_dims={{{_dims(line, f'{side}_{kind}_dimensions')}}}"
        for side in ("lhs", "rhs")
        for kind in ("batch", "contracting")
    )
    params = [f"{ops.name}.p{i}" for i in range(n_operands)]
    value = ops.op(f"dot({params[0]}, {params[1]}), {dims}")
    if alpha != 1.0:
        value = ops.op(f"multiply({value}, {ops.const(alpha)})")
    if beta != 0.0:
        c = params[2] if beta == 1.0 else ops.op(f"multiply({params[2]}, {ops.const(beta)})")
        value = ops.op(f"add({value}, {c})")
    if epilogue.startswith("BIAS"):
        rank = ops.shape.split("]")[0].count(",") + 1
        bias = ops.op(f"broadcast({params[2 + (beta != 0.0)]}), dimensions={{{rank - 1}}}")
        value = ops.op(f"add({value}, {bias})")
    if epilogue.endswith("RELU"):
        value = ops.op(f"maximum({value}, {ops.const(0.0)})")
    if epilogue.endswith("GELU"):
        ops.gelu(value)


def _gemm_lines(
    indent: str, root: str, name: str, shape: str, line: str, shapes: dict[str, str]
) -> tuple[list[str], list[str]]:
    """(call-site lines, a computation) for one cuBLAS GEMM custom call: the GEMM and its epilogue
    as one fusion of the ``dot`` it computes and the elementwise ops cuBLAS applies after it
    (``_epilogue``), so that its bytes are its operands and result, as the library moves them. A
    tuple's first output is the result, its last the library's workspace, kept as zeros
    (``workspaces_as_empty`` makes it empty first)."""
    operands = re.findall(r"%[\w.\-]+", line.split("custom-call(", 1)[1].split(")", 1)[0])
    arrays = [f"{t}{d}{lay}" for t, d, lay in _ARRAY.findall(shape)]
    ops = _Ops(name, arrays[0])
    _epilogue(ops, line, len(operands))
    head = ", ".join(f"{name[1:]}.p{i}: {shapes[o]}" for i, o in enumerate(operands))
    computation = [
        f"{name}.gemm ({head}) -> {arrays[0]} {{",
        *(f"  {name}.p{i} = {shapes[o]} parameter({i})" for i, o in enumerate(operands)),
        *ops.lines[:-1],
        ops.lines[-1].replace("  ", "  ROOT ", 1),
        "}",
        "",
    ]
    call = f"fusion({', '.join(operands)}), kind=kOutput, calls={name}.gemm"
    if not shape.startswith("("):
        return [f"{indent}{root}{name} = {shape} {call}"], computation
    extra = _zeros(indent, "", f"{name}.w", f"({', '.join(arrays[1:])})")[:-1]
    parts = [f"{name}.r", *(f"{name}.w.z{i}" for i in range(len(arrays) - 1))]
    return [
        f"{indent}{name}.r = {arrays[0]} {call}",
        *extra,
        f"{indent}{root}{name} = {shape} tuple({', '.join(parts)})",
    ], computation


_DEFINITION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = ([a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?) ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%[\w.\-]+ \(")


def gemms_as_dots(hlo_text: str) -> str:
    """``hlo_text`` with each cuBLAS GEMM custom call replaced by a fusion of the ``dot`` it computes
    and its epilogue (``_gemm_lines``), so that XLA's generic cost model can count it."""
    lines = hlo_text.splitlines()
    shapes = {m.group(1): m.group(2) for m in map(_DEFINITION.match, lines) if m}
    out: list[str] = []
    head = 0  # where the current computation starts in ``out``: new ones go before it
    for line in lines:
        if _COMPUTATION.match(line):
            head = len(out)
        m = _CUSTOM_CALL.match(line)
        if m is None or '"gemm_backend_config"' not in line:
            out.append(line)
            continue
        indent, root, name, shape = m.groups()
        call, computation = _gemm_lines(indent, root or "", name, shape, line, shapes)
        out[head:head] = computation
        head += len(computation)
        out.extend(call)
    return "\n".join(out)


_ATTENTION = '"cudnn_fmha_backend_config"'


def _zeros(indent: str, root: str, name: str, shape: str) -> list[str]:
    """HLO lines defining ``name`` as zeros of ``shape`` (an array or a tuple of arrays)."""
    arrays = _ARRAY.findall(shape)
    tupled = shape.startswith("(")
    parts = [f"{name}.z{i}" for i in range(len(arrays))] if tupled else [name]
    lines = []
    for part, (dtype, dims, layout) in zip(parts, arrays, strict=True):
        lines.append(f"{indent}{part}.c = {dtype}[] constant(0)")
        head = "" if tupled else root
        lines.append(
            f"{indent}{head}{part} = {dtype}{dims}{layout} broadcast({part}.c), dimensions={{}}"
        )
    if tupled:
        lines.append(f"{indent}{root}{name} = {shape} tuple({', '.join(parts)})")
    return lines


def attention_as_zeros(hlo_text: str) -> str:
    """``hlo_text`` with each cuDNN fused-attention custom call replaced by zeros of its output
    shapes, which XLA's generic model can cost (a custom call's FLOPs are unknown to it: -1)."""
    out = []
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.match(line)
        if m is None or _ATTENTION not in line:
            out.append(line)
            continue
        indent, root, name, shape = m.groups()
        out.extend(_zeros(indent, root or "", name, shape))
    return "\n".join(out)


def fused_attention_flops(line: str) -> int:
    """FLOPs of one cuDNN fused-attention custom call (0 for any other line), counted as XLA counts
    the dots the call fuses: 2 per multiply-add of each batched product over [B, N, T, S] pairs
    (``intermediate_tensor_shape``) and head dim H. The forward runs 2 products (q·kᵀ, p·v); the
    backward 5 (q·kᵀ again, flash attention keeping no scores, then dv, dp, dq and dk). A causal
    mask (T = S) is counted as its T(T + 1)/2 visible pairs: the fused kernel skips masked tiles."""
    if _ATTENTION not in line or _CUSTOM_CALL.match(line) is None:
        return 0
    shape = re.search(
        r'"intermediate_tensor_shape":\{"dimensions":\["(\d+)","(\d+)","(\d+)","(\d+)"\]', line
    )
    operands = re.search(r"operand_layout_constraints=\{[a-z0-9]+\[([\d,]+)\]", line)
    if shape is None or operands is None:
        raise HloCostError(f"cannot read a fused attention's shapes: {line.strip()[:200]}")
    B, N, T, S = (int(d) for d in shape.groups())
    H = int(operands.group(1).split(",")[-1])
    pairs = T * (T + 1) // 2 if '"mask_type":"CAUSAL"' in line and T == S else T * S
    products = 5 if "Backward" in line else 2
    return products * 2 * B * N * H * pairs


def gemm_flops(line: str, lhs_dims: tuple[int, ...]) -> int:
    """FLOPs of one cuBLAS GEMM custom call (0 for any other line): 2 per multiply-add, the
    result's elements (its first output) times the size of the dimensions of its left operand
    (``lhs_dims``) that its backend config contracts."""
    m = _CUSTOM_CALL.match(line)
    if m is None or '"gemm_backend_config"' not in line:
        return 0
    _, dims, _ = _ARRAY.findall(m.group(4))[0]
    result = tuple(int(d) for d in dims[1:-1].split(",") if d)
    contracted = tuple(int(d) for d in _dims(line, "lhs_contracting_dimensions").split(",") if d)
    return product_flops(result, lhs_dims, contracted)


def product_flops(
    result: tuple[int, ...], lhs: tuple[int, ...], contracting: tuple[int, ...]
) -> int:
    """FLOPs of a matrix product (2 per multiply-add): its result's elements times the size of its
    left operand's (dimensions ``lhs``) ``contracting`` dimensions (those it lacks left out)."""
    return 2 * math.prod(result) * math.prod(lhs[d] for d in contracting if d < len(lhs))


def custom_calls(hlo_text: str) -> collections.Counter[str]:
    """How many custom calls of each target an HLO text makes (cuBLAS GEMMs, cuDNN attention...)."""
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def library_workspace_bytes(hlo_text: str) -> int:
    """The largest scratch buffer a cuBLAS or cuDNN call of the program asks for (its last, byte
    typed output; 0 on a CPU): part of XLA's temporaries on a GPU (32 MiB for a cuBLASLt GEMM on an
    H200), held for the libraries rather than for any value of the model."""
    return max(_workspace_shapes(hlo_text).values(), default=0)


def _workspace_shapes(hlo_text: str) -> dict[str, int]:
    """The byte-typed scratch shapes (``s8[N]``) that the cuBLAS and cuDNN calls of a program ask
    for (each call's last output), with their sizes in bytes."""
    shapes = {}
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.match(line)
        if m is not None and 'custom_call_target="__cu' in line:
            dtype, dims, _ = _ARRAY.findall(m.group(4))[-1]
            if dtype in ("s8", "u8"):
                shapes[f"{dtype}{dims}"] = int(dims[1:-1])
    return shapes


def workspaces_as_empty(hlo_text: str) -> str:
    """``hlo_text`` with the libraries' scratch shapes (``_workspace_shapes``) empty wherever they
    appear (a call's outputs, the fusions and tuples that pass them on): scratch is not traffic of
    the model, and a fusion that holds a GEMM would otherwise count its 32 MiB as written."""
    for shape in _workspace_shapes(hlo_text):
        hlo_text = re.sub(rf"{re.escape(shape)}(?=[{{),])", f"{shape[:2]}[0]", hlo_text)
    return hlo_text


def costable(hlo_text: str) -> str:
    """An optimized HLO module as XLA's generic model can cost it, rewritten once for all of its
    computations: scratch emptied (``workspaces_as_empty``), cuBLAS GEMMs as fusions of their dot
    and epilogue (``gemms_as_dots``), cuDNN fused attention as zeros (its FLOPs:
    ``fused_attention_flops``)."""
    try:
        return attention_as_zeros(gemms_as_dots(workspaces_as_empty(hlo_text)))
    except (KeyError, IndexError) as err:  # an operand or shape the rewrite could not read
        raise HloCostError(f"a library call could not be rewritten: {err!r}") from err


def computation_costs(hlo_text: str, computation: str) -> Any:
    """XLA's (generic) cost analysis of ``computation`` of a ``costable`` module, as
    ``cost_analysis()`` reports it for a program made of that computation alone."""
    from_text, cost_analysis = _entry_points()
    try:
        text = module_with_entry(hlo_text, computation)
        return cost_analysis(jax.devices("cpu")[0].client, from_text(text))
    except HloCostError:
        raise
    except Exception as err:  # XLA raises its own status errors (parse, unsupported op)
        raise HloCostError(f"XLA could not cost {computation!r}: {str(err)[:300]}") from err
