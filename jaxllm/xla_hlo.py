# pyright: reportPrivateImportUsage=false
"""The one place jaxllm reaches into private XLA entry points: costing one computation of an
optimized HLO module by the backend's own cost model.

``compiled.cost_analysis()`` (public) costs a whole program; loop correction (``jaxllm.cost``) also
needs the cost of single loop bodies. jaxlib has no public API for that, so this module parses the
module text with ``jaxlib._hlo.hlo_module_from_text`` and costs it with
``xla_client._xla.hlo_module_cost_analysis`` on the CPU client, whatever the program's backend: a
GPU's PJRT C API client does not implement per-module cost analysis, and XLA's generic cost model
reproduces a GPU program's own ``cost_analysis()`` (checked on an H200: equal FLOPs and bytes for a
whole train step). The generic model cannot see inside custom calls; cuBLAS GEMMs (the one custom
call a GPU's own model costs) are rewritten into the equivalent ``dot`` before costing. If a jax
upgrade removes either entry point, ``HloCostError`` says so; callers report the figures as not
loop-corrected.
"""

from __future__ import annotations

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


def computation_costs(hlo_text: str, computation: str) -> Any:
    """XLA's (generic) cost analysis of ``computation`` of an optimized HLO module, as
    ``cost_analysis()`` reports it for a program made of that computation alone."""
    from_text, cost_analysis = _entry_points()
    try:
        module = from_text(gemms_as_dots(module_with_entry(hlo_text, computation)))
        return cost_analysis(jax.devices("cpu")[0].client, module)
    except HloCostError:
        raise
    except Exception as err:  # XLA raises its own status errors (parse, unsupported op)
        raise HloCostError(f"XLA could not cost {computation!r}: {str(err)[:300]}") from err
