"""Plumbing the experiment scripts share: arguments, output folder, data files, plots, summaries.

Each script in ``experiments/`` answers one question and writes ``results/NAME/``: its data
(``data.csv`` and/or ``data.json``), PNG plots, and ``summary.md`` whose numbers come from the data.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxllm.config import ModelConfig, get_preset

Row = dict[str, Any]
# The experiments `make report` runs and experiments/report.py gathers, in the report's order.
EXPERIMENTS = (
    "roofline",
    "ops",
    "decode_batch",
    "memory",
    "seqlen",
    "estimates",
    "padding",
    "serving",
    "mesh",
)


def parse_args(
    name: str,
    doc: str | None,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    preset: bool = True,
) -> argparse.Namespace:
    """--quick (smallest scale that still shows the effect), --out (default results/NAME), and the
    script's own flags added by ``extra``; with ``preset``, --preset (default ``tiny`` with --quick,
    else ``small`` on a CPU and ``gpt2-medium`` on an accelerator) and --dtype (compute dtype;
    default the preset's on a CPU, bfloat16 on an accelerator, where bf16 is what runs fast)."""
    parser = argparse.ArgumentParser(
        prog=f"experiments/{name}.py",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smallest scale (smoke tests)")
    parser.add_argument("--out", type=Path, default=Path("results") / name, help="output folder")
    if preset:
        parser.add_argument("--preset", help="model preset (default: by device; tiny with --quick)")
        parser.add_argument(
            "--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: by device)"
        )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if getattr(args, "preset", "") is None:
        args.preset = "tiny" if args.quick else ("gpt2-medium" if accelerator() else "small")
    if preset and args.dtype is None and accelerator() and not args.quick:
        args.dtype = "bfloat16"
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def accelerator() -> bool:
    """Whether this process runs on a GPU or TPU (experiments then use larger, bf16 shapes)."""
    return jax.devices()[0].platform != "cpu"


def model_config(preset: str, dtype: str | None = None) -> ModelConfig:
    """The preset's config, computing in ``dtype`` when given (bf16 keeps f32 master weights)."""
    config = get_preset(preset)
    return config if dtype is None else config.replace(dtype=dtype)


def write_csv(path: Path, rows: list[Row]) -> None:
    """Rows (dicts) as CSV under a header of every key any row has, in first-seen order; a key a
    row lacks, or a None, is an empty cell."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with path.open("w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def environment() -> Row:
    """Device and library versions, for the head of every summary."""
    import flax
    import optax

    device = jax.devices()[0]
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }


def write_summary(path: Path, title: str, lines: list[str]) -> None:
    """``summary.md``: a title, the environment line, then the given markdown lines."""
    env = environment()
    head = f"*{env['device']} ({env['platform']}), jax {env['jax']}, flax {env['flax']}*"
    path.write_text("\n".join([f"# {title}", "", head, "", *lines]) + "\n")
