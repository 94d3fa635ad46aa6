"""Markdown tables of `scripts/gpu_variants.sh` passes: each variant of the GPU train and decode
steps timed three ways (``scripts/gpu_profile.py``), beside the PyTorch peer of the same pass.

Usage: python3 scripts/gpu_variants_summary.py DIR > DIR/README.md
DIR holds one folder per pass (``pass1``, ``pass2``, ...), each with ``variants.jsonl``, and where
the pass measured them ``torch_peer.jsonl`` and ``calibration.json``; a ``NOTES.md`` beside them is
printed first. Every number printed comes from those files and jaxllm's closed forms.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gpu_summary import json_lines  # this script's folder

from jaxllm import analytic, hardware, phases
from jaxllm.config import get_preset


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _ratio(torch_s: float | None, ours: float | None) -> str:
    return "-" if not torch_s or not ours else f"{torch_s / ours:.2f}x"


def _torch(rows: list[dict[str, Any]], kind: str, **match: Any) -> float | None:
    for row in rows:
        if row.get("kind") == kind and all(row.get(k) == v for k, v in match.items()):
            return row["seconds"]
    return None


def _label(row: dict[str, Any]) -> str:
    """The variant's name, XLA options (or flags) and code variants (``gpu_profile.py`` flags)."""
    how = row.get("options") or row.get("xla_flags") or {}
    parts = [json.dumps(how) if how not in ("", {}) else "XLA defaults", *row.get("code", [])]
    return f"`{row['label']}` ({', '.join(parts)})"


def _digest(row: dict[str, Any]) -> str:
    """The first call's result (``gpu_profile.digest``): variants of one step should agree within
    bf16 rounding. Rows of passes before round 23 have none."""
    d = row.get("digest")
    if not d:
        return "-"
    if "loss" in d:
        return f"loss {d['loss']:.5f}"
    top = d["argmax"]
    return f"sum {d['logits_sum']:.5g}, argmax {top[:4]}{' ...' if len(top) > 4 else ''}"


def train_table(rows: list[dict[str, Any]], torch: list[dict[str, Any]], peak: float) -> list[str]:
    out = [
        "| variant | waited for, ms | in a loop, ms | device busy, ms | MFU (sheet, waited) "
        "| PyTorch eager / jaxllm (waited, loop) | first call |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cfg = get_preset(row["preset"]).replace(dtype="bfloat16")
        flops = analytic.train_flops(cfg, row["batch"], row["seq"], "xla")
        t = _torch(torch, "train", batch=row["batch"], seq=row["seq"])
        out.append(
            f"| {_label(row)} | {_ms(row['sync_s'])} | {_ms(row['chained_s'])} "
            f"| {_ms(row['busy_s'])} | {flops / row['sync_s'] / peak:.1%} "
            f"| {_ratio(t, row['sync_s'])}, {_ratio(t, row['chained_s'])} | {_digest(row)} |"
        )
    return [*out, "", f"PyTorch eager: {_ms(_torch(torch, 'train'))} ms a step (same pass).", ""]


def decode_table(
    rows: list[dict[str, Any]], torch: list[dict[str, Any]], read: float | None
) -> list[str]:
    out = [
        "| variant | preset, B | waited for, ms | in a loop, ms | in `generate`, ms "
        "| `generate`: of calibrated read | PyTorch eager, CUDA graph / `generate` | first call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cfg = get_preset(row["preset"]).replace(dtype="bfloat16", param_dtype="bfloat16")
        program = phases.build(cfg, "decode", row["batch"], row["seq"])
        moved = analytic.decode_bytes(program.config, row["batch"], row["seq"] - 1, program.slots)
        gen = row.get("generate_s")
        share = f"{moved['total_allocated'] / gen / read:.1%}" if gen and read else "-"
        peer = (
            ", ".join(
                _ratio(_torch(torch, "decode", batch=row["batch"], graph=g), gen)
                for g in (False, True)
            )
            if row["preset"] == "gpt2-medium"
            else "-"
        )
        out.append(
            f"| {_label(row)} | {row['preset']}, {row['batch']} | {_ms(row['sync_s'])} "
            f"| {_ms(row['chained_s'])} | {_ms(gen)} | {share} | {peer} | {_digest(row)} |"
        )
    return [*out, ""]


def main(root: Path) -> None:
    notes = root / "NOTES.md"
    lines = [notes.read_text().rstrip(), ""] if notes.is_file() else []
    sheet = hardware.published("NVIDIA H200")
    assert sheet is not None
    read = None
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        calibration = folder / "calibration.json"
        if calibration.is_file():
            read = json.loads(calibration.read_text())["read_bytes_per_s"]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        rows, torch = json_lines(folder / "variants.jsonl"), json_lines(folder / "torch_peer.jsonl")
        lines += [f"## {folder.name}", ""]
        trains = [r for r in rows if r["phase"] == "train"]
        if trains:
            lines += [
                f"### Train step, {trains[0]['preset']} bf16 B={trains[0]['batch']} "
                f"T={trains[0]['seq']}",
                "",
            ]
            lines += train_table(trains, torch, sheet.bf16_flops_per_s)
        decodes = [r for r in rows if r["phase"] == "decode"]
        if decodes:
            lines += [f"### Decode step, bf16 weights and cache, context {decodes[0]['seq']}", ""]
            lines += decode_table(decodes, torch, read)
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
