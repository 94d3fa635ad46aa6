"""Gather a training run, its samples and every experiment's results into one report.

    python experiments/report.py [--results results] [--run runs/small] [--out report]

Writes ``OUT/REPORT.md`` headed by the device, its calibrated peaks and the library versions, then
the training run (from ``RUN/summary.json``), the generated samples (``OUT/samples.json``, as written
by ``jaxllm generate --json``) and each experiment's ``summary.md``, with its plots copied beside the
report so that the folder stands alone.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from jaxllm import experiment, hardware
from jaxllm.tables import peaks_line, sheet_line


def header() -> list[str]:
    env = experiment.environment()
    cal = hardware.calibrate()
    lines = [
        "# jaxllm report: how training and serving use this machine",
        "",
        f"- Device: **{env['device']}** ({env['platform']}, {env['devices']} device(s), "
        f"{env['machine']})",
        f"- Calibrated peaks ({cal['date']}): {peaks_line(cal)}",
    ]
    sheet = sheet_line(cal)
    lines += [f"- Published peaks: {sheet}"] if sheet else []
    lines += [f"- **Suspect calibration**: {line}" for line in cal.get("suspect", [])]
    lines.append(
        f"- Python {env['python']}, jax {env['jax']}, flax {env['flax']}, optax {env['optax']}"
    )
    return [*lines, ""]


def training(run: Path) -> list[str]:
    path = run / "summary.json"
    if not path.is_file():
        return ["## Training", "", f"No training summary at {path}.", ""]
    summary = json.loads(path.read_text())
    lines = [
        "## Training",
        "",
        f"Run directory `{run}` (`jaxllm train`).",
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    for key, value in summary.items():
        if isinstance(value, dict | list):
            value = json.dumps(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"| {key} | {value} |")
    return [*lines, ""]


def samples(path: Path) -> list[str]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    items = data.get("results", data) if isinstance(data, dict) else data
    lines = ["## Samples from the trained model", ""]
    for item in items:
        lines += [
            f"**Prompt** `{item['prompt']!r}`",
            "",
            "```",
            item["prompt"] + item["text"],
            "```",
            "",
        ]
    if isinstance(data, dict) and "timing" in data:
        lines += [f"Timing: `{json.dumps(data['timing'])}`", ""]
    return lines


def experiment_section(name: str, results: Path, out: Path) -> list[str]:
    source = results / name
    summary = source / "summary.md"
    if not summary.is_file():
        return [f"## {name}", "", f"Missing: {summary} (run `python experiments/{name}.py`).", ""]
    target = out / name
    if target.resolve() != source.resolve():
        shutil.copytree(source, target, dirs_exist_ok=True)
    text = summary.read_text()
    text = re.sub(r"^# ", "## ", text, count=1, flags=re.M)
    text = re.sub(r"\]\((?!http)([^)]+)\)", lambda m: f"]({name}/{m.group(1)})", text)
    return [text, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--run", type=Path, default=Path("runs/small"))
    parser.add_argument("--out", type=Path, default=Path("report"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = header() + training(args.run) + samples(args.out / "samples.json")
    for name in experiment.EXPERIMENTS:
        lines += experiment_section(name, args.results, args.out)
    (args.out / "REPORT.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
