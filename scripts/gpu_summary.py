"""Markdown summary of one `scripts/gpu_pass.sh` run: calibration beside PyTorch's, the analyze rows
(XLA against analytic FLOPs, wall time, MFU/MBU), jaxllm against the PyTorch peer, generate's decode
loop, and the test suite's closing line.

Usage: python3 scripts/gpu_summary.py RESULTS_DIR > docs/results/DEVICE/README.md
RESULTS_DIR is the unpacked results.tar.gz of the pass. Every number printed comes from those files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def calibration(res: Path) -> list[str]:
    ours, torch = _json(res / "calibration.json"), _json(res / "torch_peaks.json")
    if ours is None:
        return ["No calibration.", ""]
    out = [
        f"Device: **{ours['device_kind']}**, jax {ours['jax']}"
        + (f", torch {torch['torch']}" if torch else ""),
        "",
        "| peak | jaxllm calibrate | PyTorch (`torch_peaks.json`) | jaxllm / PyTorch |",
        "|---|---|---|---|",
    ]
    for key in (
        "bf16_flops_per_s",
        "tf32_flops_per_s",
        "f32_flops_per_s",
        "read_bytes_per_s",
        "copy_bytes_per_s",
    ):
        mine, theirs = ours.get(key), (torch or {}).get(key)
        ratio = f"{mine / theirs:.3f}" if mine and theirs else "-"
        out.append(f"| {key} | {mine or 0:.4g} | {theirs or 0:.4g} | {ratio} |")
    out += ["", f"Suspect figures: {ours.get('suspect') or 'none'}.", ""]
    return out


def _wall(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else "-"


def analyze_rows(res: Path) -> list[str]:
    out = [
        "| row | XLA / analytic FLOPs | loop-corrected | compile s | measured s | tokens/s | MFU | MBU | MFU/MBU (calibrated) | command exit, wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted((res / "analyze").glob("*.json")):
        row = _json(path)
        wall = _wall(path.with_suffix(".wall"))
        if row is None:
            err = path.with_suffix(".err")
            tail = (
                err.read_text()[-160:].replace("\n", " ").replace("|", "/") if err.is_file() else ""
            )
            out.append(f"| {path.stem} | - | - | - | - | - | - | - | - | {wall} {tail} |")
            continue
        a, x, roof = row["analytic"], row["xla"], row["roofline"]
        m = row.get("measured") or {}
        cal = roof.get("calibrated", {})

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.1%}"

        out.append(
            f"| {path.stem} | {x['flops'] / a['flops']:.3f} | {x['loop_corrected']} | "
            f"{x['compile_seconds']:.1f} | {m.get('seconds_median', float('nan')):.4g} | "
            f"{m.get('tokens_per_s', float('nan')):.4g} | {pct(roof.get('mfu'))} | {pct(roof.get('mbu'))} | "
            f"{pct(cal.get('mfu'))} / {pct(cal.get('mbu'))} | {wall} |"
        )
    return [*out, ""]


def peers(res: Path) -> list[str]:
    torch = json_lines(res / "torch_peer.jsonl")
    if not torch:
        return ["No PyTorch peer figures.", ""]
    rows = {p.stem: _json(p) for p in (res / "analyze").glob("*.json")}
    out = [
        "| phase | jaxllm s | PyTorch s | jaxllm / PyTorch speed |",
        "|---|---|---|---|",
    ]
    for t in torch:
        if t.get("kind") == "train" and not t.get("compile"):
            mine = (rows.get("train_m_bf16") or {}).get("measured", {}).get("seconds_median")
            label = f"gpt2-medium train bf16 B={t['batch']} T={t['seq']} (PyTorch eager)"
        elif t.get("kind") == "decode":
            mine = (
                (rows.get(f"dec_m_b{t['batch']}") or {}).get("measured", {}).get("seconds_median")
            )
            how = "CUDA graph" if t["graph"] else "eager"
            label = f"gpt2-medium decode bf16 B={t['batch']} context {t['context']} (PyTorch {how})"
        else:
            continue
        ratio = f"{t['seconds'] / mine:.2f}x" if mine else "-"
        out.append(f"| {label} | {mine or float('nan'):.4g} | {t['seconds']:.4g} | {ratio} |")
    return [*out, ""]


def train_variants(res: Path) -> list[str]:
    rows = json_lines(res / "train_variants.jsonl")
    if not rows:
        return ["No train variants.", ""]
    torch = [t for t in json_lines(res / "torch_peer.jsonl") if t.get("kind") == "train"]
    theirs = torch[0]["seconds"] if torch else None
    out = [
        "| layers | B | T | compile s | step s | tokens/s | MFU (data sheet) | XLA / analytic FLOPs | "
        "temp GB | PyTorch eager / jaxllm step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        ratio = f"{theirs / r['step_s']:.2f}x" if theirs else "-"
        out.append(
            f"| {r['variant']} | {r['batch']} | {r['seq']} | {r['compile_s']} | {r['step_s']:.4g} | "
            f"{r['tokens_per_s']:.4g} | {mfu} | {r['xla_over_analytic']:.4f} | {r['temp_gb']:.2f} | "
            f"{ratio} |"
        )
    return [*out, ""]


def generate_speed(res: Path, read_bw: float | None) -> list[str]:
    rows = json_lines(res / "generate_speed.jsonl")
    if not rows:
        return ["No generate figures.", ""]
    out = [
        "| preset | B | prompt | new | s/step | bytes/s | of calibrated read bandwidth |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['bytes_per_s'] / read_bw:.1%}" if read_bw else "-"
        out.append(
            f"| {r['preset']} | {r['batch']} | {r['prompt']} | {r['new']} | {r['s_per_step']:.4g} | "
            f"{r['bytes_per_s']:.4g} | {share} |"
        )
    return [*out, ""]


def main(argv: list[str]) -> int:
    res = Path(argv[0])
    cal = _json(res / "calibration.json") or {}
    pytest_lines = [
        line.strip()
        for path in sorted(res.glob("pytest*.txt"))
        for line in path.read_text().splitlines()
        if "FAILED" in line or "ERROR" in line or " passed" in line
    ]
    notes = res / "NOTES.md"
    lines = [
        "# jaxllm on a GPU: one `scripts/gpu_pass.sh` run",
        "",
        "Generated by `scripts/gpu_summary.py` from the pass's result files (beside this page).",
        "",
        *([notes.read_text().strip(), ""] if notes.is_file() else []),
        "## Calibration",
        "",
        *calibration(res),
        "## `jaxllm analyze` rows",
        "",
        "Row names: `train_m_bf16` = gpt2-medium train B=8 T=1024 bf16 compute; `train_g_f32` = gpt2 "
        "train B=8 T=1024 f32 (TF32), not timed; `dec_l1b_b1` = llama3.2-1b decode B=1 S=1024, bf16 "
        "weights and cache; `prefill_m_bf16` = gpt2-medium prefill B=1 T=1024; `dec_m_bN` = gpt2-medium "
        "decode B=N S=1024; `dec_g_b1_s256` = gpt2 decode B=1 S=256. MFU/MBU against the data sheet, "
        "then against the calibrated peaks. The last column is the exit status and wall seconds of the "
        "whole `analyze` command (process start to exit).",
        "",
        *analyze_rows(res),
        "## gpt2-medium bf16 train step: layers rolled and unrolled (`scripts/gpu_train_variants.py`)",
        "",
        *train_variants(res),
        "## Against PyTorch on the same machine (`torch_peer.jsonl`)",
        "",
        *peers(res),
        "## Decode inside `generate`'s on-device loop (`scripts/generate_speed.py`)",
        "",
        *generate_speed(res, cal.get("read_bytes_per_s")),
        "## Test suite (`pytest -m 'not slow'`)",
        "",
        *(f"    {line}" for line in pytest_lines),
        "",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
