"""The one place jaxllm reaches into private XLA entry points: costing one computation of an
optimized HLO module by the backend's own cost model.

``compiled.cost_analysis()`` (public) costs a whole program; loop correction (``jaxllm.cost``) also
needs the cost of single loop bodies. jaxlib has no public API for that, so this module parses the
module text with ``jaxlib._hlo.hlo_module_from_text`` and costs it with
``xla_client._xla.hlo_module_cost_analysis`` on the program's own client (the same cost model as
``cost_analysis()``: ``GpuHloCostAnalysis`` on a GPU, the generic one on a CPU). If a jax upgrade
removes either, ``HloCostError`` says so; callers report the figures as not loop-corrected.
"""

from __future__ import annotations

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
            f"jaxlib {jax.lib.__version__} has no hlo_module_from_text / "  # pyright: ignore[reportAttributeAccessIssue]
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


def computation_costs(compiled: Any, hlo_text: str, computation: str) -> Any:
    """XLA's cost analysis of ``computation`` of ``compiled``'s optimized module, as the backend's
    ``cost_analysis()`` would report it for a program made of that computation alone."""
    from_text, cost_analysis = _entry_points()
    try:
        module = from_text(module_with_entry(hlo_text, computation))
        return cost_analysis(compiled.runtime_executable().client, module)
    except HloCostError:
        raise
    except Exception as err:  # XLA raises its own status errors (parse, unsupported op)
        raise HloCostError(f"XLA could not cost {computation!r}: {str(err)[:300]}") from err
