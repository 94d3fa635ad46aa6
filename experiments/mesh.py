"""Beyond one device: the train step on five mesh shapes of 8 simulated CPU devices, and the same
shape families projected onto 8 and 64 H100s.

    python experiments/mesh.py [--preset small] [--quick]

On 8 simulated CPU devices (the script re-runs itself with
``--xla_force_host_platform_device_count=8`` when it has fewer), for (data, tensor) = 1x8, 8x1,
2x4, 4x2 and (fsdp, tensor) = 4x2, ``jaxllm.sharded.analyze_train``: per-device memory (closed form
and XLA's footprint), collective bytes (in the compiled HLO and in closed form), the step predicted
as compute, memory and communication terms (each simulated device gets 1/8 of the host's calibrated
peaks; the "link" is the calibrated copy bandwidth) and the measured step. The model is the preset
with 8 heads, so that every mesh divides it.

Then ``jaxllm.projection``: llama3-8b (bf16 compute, float32 master weights and AdamW, remat
``full``) on 8 H100s (one node) and 64 (8 nodes), data sheet peaks, NVLink within a node and
InfiniBand between: per-device memory against its 80 GB and the three-term step time. A projection: no
H100 ran here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import jax

from jaxllm import experiment, hardware, projection, sharded
from jaxllm import mesh as meshes
from jaxllm.tables import si

DEVICES = 8
MESHES = ["tensor=8", "data=8", "data=2,tensor=4", "data=4,tensor=2", "fsdp=4,tensor=2"]
# The same families on 64 devices: tensor within a node (<= 8), data or fsdp across nodes.
PROJECTED = {
    8: [*MESHES, "fsdp=8"],
    64: [
        "data=64",
        "data=32,tensor=2",
        "data=16,tensor=4",
        "data=8,tensor=8",
        "fsdp=64",
        "fsdp=32,tensor=2",
        "fsdp=8,tensor=8",
        "data=8,fsdp=8",
    ],
}
PROJECTION = {"preset": "llama3-8b", "dtype": "bfloat16", "remat": "full", "batch": 64, "seq": 2048}
H100 = "NVIDIA H100 80GB HBM3"


def measured_rows(preset: str, batch: int, seq: int, quick: bool) -> list[dict[str, Any]]:
    """``analyze_train`` with ``measure`` on each of MESHES, flattened to one CSV row each."""
    config = experiment.model_config(preset).replace(n_heads=8, n_kv_heads=8)
    calibration = hardware.calibrate(quick=quick)
    rows = []
    for spec in MESHES:
        mesh = meshes.make_mesh(meshes.parse_mesh(spec))
        row = sharded.analyze_train(config, mesh, batch, seq, calibration, measure=True)
        print("\n".join(sharded.table(row)), flush=True)
        rows.append(flat(spec, row))
    return rows


def flat(spec: str, row: dict[str, Any]) -> experiment.Row:
    """One mesh's bytes (per device) and seconds."""
    a, p = row["analytic"], row["predicted"]
    hlo = row["hlo_collectives"]
    return {
        "mesh": spec,
        "analytic_memory_bytes": a["memory"]["total"],
        "xla_footprint_bytes": row["xla"]["footprint_bytes"],
        "analytic_collective_bytes": sum(a["collectives"].values()),
        "hlo_collective_bytes": sum(hlo.values()),
        "hlo_all_reduce_bytes": hlo["all-reduce"],
        "hlo_all_gather_bytes": hlo["all-gather"],
        "link_bytes": a["link_bytes"],
        "compute_s": p["compute_seconds"],
        "memory_s": p["memory_seconds"],
        "communication_s": p["communication_seconds"],
        "predicted_s": p["predicted_seconds"],
        "measured_s": row["measured"]["seconds_median"],
    }


def projection_rows() -> list[experiment.Row]:
    """PROJECTION's model on each of PROJECTED's meshes of H100s, one row each."""
    c = PROJECTION
    config = experiment.model_config(c["preset"], c["dtype"]).replace(remat=c["remat"])
    sheet = hardware.published(H100)
    assert sheet is not None
    rows = []
    for devices, specs in PROJECTED.items():
        cluster = projection.Cluster(sheet, devices)
        for spec in specs:
            out = projection.project_train(
                config, meshes.parse_mesh(spec), c["batch"], c["seq"], cluster
            )
            p = out["predicted"]
            rows.append(
                {
                    "devices": devices,
                    "mesh": spec,
                    "memory_bytes": out["memory"]["total"],
                    "capacity_bytes": out["capacity_bytes"],
                    "fits": out["fits"],
                    "compute_s": p["compute_seconds"],
                    "memory_s": p["memory_seconds"],
                    "communication_s": p["communication_seconds"],
                    "predicted_s": p["predicted_seconds"],
                    "bound": out["bound"],
                    "network": ",".join(k for k, v in out["links"].items() if v == "network"),
                }
            )
    return rows


def plot(rows: list[experiment.Row], projected: list[experiment.Row], path) -> None:
    plt = experiment.pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4))
    x = range(len(rows))
    names = [r["mesh"] for r in rows]
    ax1.bar([i - 0.2 for i in x], [r["analytic_memory_bytes"] / 2**20 for r in rows], 0.4)
    ax1.bar([i + 0.2 for i in x], [r["xla_footprint_bytes"] / 2**20 for r in rows], 0.4)
    ax1.legend(["closed form", "XLA footprint"], fontsize=8)
    ax1.set(ylabel="MiB per device", title="Memory per device (8 simulated CPUs)")
    busy = [max(r["compute_s"], r["memory_s"]) for r in rows]
    ax2.bar(x, busy, 0.5, label="predicted: max(compute, memory)")
    ax2.bar(x, [r["communication_s"] for r in rows], 0.5, bottom=busy, label="+ communication")
    ax2.plot(x, [r["measured_s"] for r in rows], "ko", label="measured")
    ax2.legend(fontsize=8)
    ax2.set(ylabel="seconds per step", title="Predicted against measured step")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    labels = [f"{r['devices']}: {r['mesh']}" for r in projected]
    ax3.barh(labels, [r["memory_bytes"] / 1e9 for r in projected], color="C2")
    ax3.axvline(projected[0]["capacity_bytes"] / 1e9, color="C3", label="capacity")
    ax3.set(xlabel="GB per device", title="llama3-8b on H100s (projection)")
    ax3.legend(fontsize=8)
    ax3.tick_params(axis="y", labelsize=7)
    experiment.save_figure(fig, path)


def sheet_text() -> str:
    """The H100's published figures the projection uses, in words."""
    sheet = hardware.published(H100)
    assert sheet is not None and sheet.link_bytes_per_s and sheet.network_bytes_per_s
    return (
        f"{sheet.name} ({si(sheet.bf16_flops_per_s, 'FLOP/s')} bf16 dense, "
        f"{si(sheet.bandwidth_bytes_per_s, 'B/s')}, {si(sheet.memory_bytes, 'B')}; links one "
        f"direction: {si(sheet.link_bytes_per_s, 'B/s')} NVLink within a node of 8, "
        f"{si(sheet.network_bytes_per_s, 'B/s')} InfiniBand between; jaxllm/hardware.py)"
    )


def summary(rows: list[experiment.Row], projected: list[experiment.Row], shape: str) -> list[str]:
    c = PROJECTION
    lines = [
        f"Measured: {shape}, 8 heads, on {DEVICES} simulated CPU devices sharing this host (each "
        "predicted at 1/8 of its calibrated peaks; the link is the calibrated copy bandwidth). "
        "Memory and collective bytes per device; measured = median of 5 steps.",
        "",
        "| mesh | memory: closed form | XLA footprint | collectives: HLO | closed form "
        "| compute | memory | comm. | predicted | measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mesh']} | {si(r['analytic_memory_bytes'], 'B')} | "
            f"{si(r['xla_footprint_bytes'], 'B')} | {si(r['hlo_collective_bytes'], 'B')} | "
            f"{si(r['analytic_collective_bytes'], 'B')} | {si(r['compute_s'], 's')} | "
            f"{si(r['memory_s'], 's')} | {si(r['communication_s'], 's')} | "
            f"{si(r['predicted_s'], 's')} | {si(r['measured_s'], 's')} |"
        )
    lines += [
        "",
        f"**Projection, not a measurement**: {c['preset']} ({c['dtype']} compute, float32 master "
        f"weights and AdamW, remat {c['remat']}: the backward's recompute of one layer at a time is "
        f"not counted), global batch {c['batch']} x {c['seq']} tokens, on {sheet_text()}. "
        "Communication is added to max(compute, memory), not overlapped.",
        "",
        "| GPUs | mesh | memory / GPU | fits | compute | memory | comm. | predicted "
        "| bound | over InfiniBand |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in projected:
        lines.append(
            f"| {r['devices']} | {r['mesh']} | {si(r['memory_bytes'], 'B')} | "
            f"{'yes' if r['fits'] else 'no'} | {si(r['compute_s'], 's')} | "
            f"{si(r['memory_s'], 's')} | {si(r['communication_s'], 's')} | "
            f"{si(r['predicted_s'], 's')} | {r['bound']} | {r['network'] or '-'} |"
        )
    return [*lines, "", "![mesh shapes](mesh.png)"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if jax.device_count() < DEVICES:  # the device count is fixed when JAX starts: a fresh process
        flags = os.environ.get("XLA_FLAGS", "")
        env = os.environ | {
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
        }
        return subprocess.run([sys.executable, __file__, *argv], env=env, check=False).returncode
    args = experiment.parse_args("mesh", __doc__, argv)
    batch, seq = (8, 16) if args.quick else (8, 128)
    rows = measured_rows(args.preset, batch, seq, args.quick)
    projected = projection_rows()
    experiment.write_csv(args.out / "data.csv", rows)
    experiment.write_csv(args.out / "projection.csv", projected)
    plot(rows, projected, args.out / "mesh.png")
    shape = f"{args.preset} train B={batch} T={seq}"
    experiment.write_summary(
        args.out / "summary.md",
        "Mesh shapes: memory, collectives and step time per device",
        summary(rows, projected, shape),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
