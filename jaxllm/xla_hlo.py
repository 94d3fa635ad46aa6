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
costing, each cuBLAS GEMM is rewritten into the ``dot`` it computes, and each cuDNN fused-attention
call into zeros of its output shapes, its products counted here from its shapes
(``fused_attention_flops``). If a jax upgrade removes either entry point, ``HloCostError`` says so;
callers then report XLA's own figures, flagged.
"""

from __future__ import annotations

import collections
import importlib.metadata
import re
from typing import Any

import jax


class HloCostError(RuntimeError):
    """This jaxlib lacks the private entry points, or could not parse or cost a computation."""


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


_GEMM = re.compile(
    r"^(\s*)(ROOT )?(%[\w.\-]+) = (\(?)([a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?)[^=]*?"
    r" custom-call\((%[\w.\-]+), (%[\w.\-]+)[^)]*\).*\"gemm_backend_config\""
)


def _dims(line: str, name: str) -> str:
    found = re.search(rf'"{name}":\[([^\]]*)\]', line)
    return ",".join(
        d.strip('" ') for d in (found.group(1) if found else "").split(",") if d.strip()
    )


def gemms_as_dots(hlo_text: str) -> str:
    """``hlo_text`` with each cuBLAS GEMM custom call replaced by the ``dot`` it computes (its
    first output; the workspace output is dropped), so that XLA's generic cost model can count it."""
    out = []
    for line in hlo_text.splitlines():
        m = _GEMM.match(line)
        if m is None:
            out.append(line)
            continue
        indent, root, name, tupled, shape, lhs, rhs = m.groups()
        dims = ", ".join(
            f"{side}_{kind}_dims={{{_dims(line, f'{side}_{kind}_dimensions')}}}"
            for side in ("lhs", "rhs")
            for kind in ("batch", "contracting")
        )
        dot = f"{name}.dot" if tupled else name
        out.append(
            f"{indent}{'' if tupled else root or ''}{dot} = {shape} dot({lhs}, {rhs}), {dims}"
        )
        if tupled:
            out.append(f"{indent}{root or ''}{name} = ({shape}) tuple({dot})")
    return "\n".join(out)


_CUSTOM_CALL = re.compile(
    r"^(\s*)(ROOT )?(%[\w.\-]+) = (\([^=]*?\)|[a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?) custom-call\("
)
_ARRAY = re.compile(r"([a-z][a-z0-9]*)(\[[\d,]*\])(\{[^}]*\})?")
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


def custom_calls(hlo_text: str) -> collections.Counter[str]:
    """How many custom calls of each target an HLO text makes (cuBLAS GEMMs, cuDNN attention...)."""
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def library_workspace_bytes(hlo_text: str) -> int:
    """The largest scratch buffer a cuBLAS or cuDNN call of the program asks for (its last, byte
    typed output; 0 on a CPU): part of XLA's temporaries on a GPU (32 MiB for a cuBLASLt GEMM on an
    H200), held for the libraries rather than for any value of the model."""
    sizes = [0]
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.match(line)
        if m is not None and 'custom_call_target="__cu' in line:
            dtype, dims, _ = _ARRAY.findall(m.group(4))[-1]
            sizes += [int(dims[1:-1])] if dtype in ("s8", "u8") else []
    return max(sizes)


def computation_costs(hlo_text: str, computation: str) -> Any:
    """XLA's (generic) cost analysis of ``computation`` of an optimized HLO module, as
    ``cost_analysis()`` reports it for a program made of that computation alone, with cuBLAS GEMMs
    costed as dots and cuDNN fused attention as zeros (its FLOPs: ``fused_attention_flops``)."""
    from_text, cost_analysis = _entry_points()
    try:
        text = attention_as_zeros(gemms_as_dots(module_with_entry(hlo_text, computation)))
        return cost_analysis(jax.devices("cpu")[0].client, from_text(text))
    except HloCostError:
        raise
    except Exception as err:  # XLA raises its own status errors (parse, unsupported op)
        raise HloCostError(f"XLA could not cost {computation!r}: {str(err)[:300]}") from err
