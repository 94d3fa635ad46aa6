"""Memory: what training holds against what serving holds, and what remat and the KV cache cost.

    python experiments/memory.py [--quick]

Training holds parameters, gradients, AdamW's two moments and the activations saved for the
backward pass; serving holds parameters and a KV cache. The stacked bars give both for each preset
(analytic, from jaxllm.analytic), with XLA's compiled footprint (argument + output − alias + temp,
compiled from shapes alone, nothing allocated) beside them where compiling is quick enough. Then the
remat policies trade activation memory for recomputed FLOPs, and the KV cache grows linearly in
batch and context.
"""

from __future__ import annotations

import sys

from jaxllm import analytic, experiment
from jaxllm import serve as serving
from jaxllm.config import get_preset
from jaxllm.measure import analyze_phase
from jaxllm.tables import si

TRAIN_PARTS = ("params", "grads", "adam", "activations")
SERVE_PARTS = ("params", "kv_cache")
REMATS = ("none", "dots", "dots_no_batch", "full")


def presets_rows(presets: list[str], batch: int, xla_presets: set[str]) -> list[experiment.Row]:
    rows = []
    for preset in presets:
        cfg = get_preset(preset)
        seq = min(cfg.max_len, 1024)
        train, serve = (
            analytic.train_memory(cfg, batch, seq),
            serving.serving_memory(cfg, batch, seq),
        )
        row: experiment.Row = {"preset": preset, "batch": batch, "seq": seq}
        row |= {f"train_{k}": train[k] for k in (*TRAIN_PARTS, "total")}
        row |= {f"serve_{k}": serve[k] for k in (*SERVE_PARTS, "total")}
        for phase, key in (("train", "xla_train_footprint"), ("decode", "xla_serve_footprint")):
            row[key] = (
                analyze_phase(cfg, phase, batch, seq).xla.footprint_bytes
                if preset in xla_presets
                else None
            )
        rows.append(row)
        print(
            f"{preset:<12} train {si(train['total'], 'B'):>9}  serve {si(serve['total'], 'B'):>9}",
            flush=True,
        )
    return rows


def remat_rows(preset: str, batch: int, seq: int) -> list[experiment.Row]:
    rows = []
    for policy in REMATS:
        cfg = get_preset(preset).replace(remat=policy)
        out = analyze_phase(cfg, "train", batch, seq)
        rows.append(
            {
                "remat": policy,
                "analytic_activation_bytes": analytic.activation_bytes(cfg, batch, seq),
                "analytic_flops": out.analytic.flops,
                "xla_flops": out.xla.flops,
                "xla_temp_bytes": out.xla.temp_bytes,
                "xla_footprint_bytes": out.xla.footprint_bytes,
            }
        )
    return rows


def kv_rows(presets: list[str]) -> list[experiment.Row]:
    rows = []
    for preset in presets:
        cfg = get_preset(preset)
        for batch in (1, 8, 32, 128):
            for seq in (128, 256, 512, 1024, 2048, 4096, 8192):
                if seq <= cfg.max_len:
                    rows.append(
                        {
                            "preset": preset,
                            "batch": batch,
                            "seq": seq,
                            "kv_bytes": analytic.kv_cache_bytes(cfg, batch, seq),
                            "param_bytes": analytic.param_bytes(cfg),
                        }
                    )
    return rows


def plot_presets(rows: list[experiment.Row], path) -> None:
    plt = experiment.pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(rows)), 5))
    width = 0.38
    for i, row in enumerate(rows):
        for side, parts, offset in (
            ("train", TRAIN_PARTS, -width / 2),
            ("serve", SERVE_PARTS, width / 2),
        ):
            bottom = 0.0
            for j, part in enumerate(parts):
                value = row[f"{side}_{part}"] / 2**30
                color = {
                    "params": "C0",
                    "grads": "C1",
                    "adam": "C2",
                    "activations": "C3",
                    "kv_cache": "C4",
                }[part]
                ax.bar(
                    i + offset,
                    value,
                    width,
                    bottom=bottom,
                    color=color,
                    label=part if i == 0 and (side == "train" or j == 1) else None,
                )
                bottom += value
            xla = row[f"xla_{side}_footprint"]
            if xla is not None:
                ax.plot(
                    i + offset,
                    xla / 2**30,
                    "k_",
                    markersize=22,
                    mew=2,
                    label="XLA footprint" if side == "train" and i == 0 else None,
                )
    ax.set_xticks(range(len(rows)), [f"{r['preset']}\ntrain | serve" for r in rows], fontsize=8)
    ax.set(
        yscale="log",
        ylabel="memory (GiB, log scale)",
        title=f"Training vs serving memory (B={rows[0]['batch']}, T = S = min(1024, context))",
    )
    ax.legend(fontsize=8)
    experiment.save_figure(fig, path)


def plot_remat(rows: list[experiment.Row], path) -> None:
    plt = experiment.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.scatter(r["xla_flops"] / 1e9, r["xla_temp_bytes"] / 2**20, s=60)
        ax.scatter(r["analytic_flops"] / 1e9, r["analytic_activation_bytes"] / 2**20, marker="x")
        ax.annotate(
            r["remat"],
            (r["xla_flops"] / 1e9, r["xla_temp_bytes"] / 2**20),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set(
        xlabel="train-step FLOPs (GFLOP; o XLA, x analytic)",
        ylabel="activations (MiB; o XLA temp, x analytic)",
        title="Remat: activation memory against recomputed FLOPs",
    )
    experiment.save_figure(fig, path)


def plot_kv(rows: list[experiment.Row], path) -> None:
    plt = experiment.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, preset in enumerate(sorted({r["preset"] for r in rows})):
        for batch, style in ((1, ":"), (8, "--"), (32, "-."), (128, "-")):
            pts = [r for r in rows if r["preset"] == preset and r["batch"] == batch]
            ax.plot(
                [r["seq"] for r in pts],
                [r["kv_bytes"] / 2**30 for r in pts],
                style,
                color=f"C{k}",
                label=f"{preset} B={batch}",
            )
        ax.axhline(pts[0]["param_bytes"] / 2**30, color=f"C{k}", alpha=0.3)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="context S (tokens per sequence)",
        ylabel="KV cache (GiB); faint line: the weights",
        title="KV cache growth: 2 × bytes × B × S × L × K × H",
    )
    ax.legend(fontsize=7, ncol=2)
    experiment.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("memory", __doc__, argv, preset=False)
    presets = (
        ["tiny", "small"]
        if args.quick
        else ["small", "gpt2", "gpt2-medium", "gpt2-xl", "llama3.2-1b", "llama2-7b", "llama3-8b"]
    )
    xla = {"tiny"} if args.quick else {"small", "gpt2"}
    rows = presets_rows(presets, batch=8, xla_presets=xla)
    remat = remat_rows(
        "tiny" if args.quick else "small",
        batch=2 if args.quick else 8,
        seq=32 if args.quick else 256,
    )
    kv = kv_rows(["small"] if args.quick else ["gpt2", "llama3-8b"])
    experiment.write_csv(args.out / "presets.csv", rows)
    experiment.write_csv(args.out / "remat.csv", remat)
    experiment.write_csv(args.out / "kv_cache.csv", kv)
    plot_presets(rows, args.out / "memory.png")
    plot_remat(remat, args.out / "remat.png")
    plot_kv(kv, args.out / "kv_cache.png")
    experiment.write_summary(
        args.out / "summary.md", "Memory: training against serving", summary_lines(rows, remat)
    )
    return 0


def summary_lines(rows: list[experiment.Row], remat: list[experiment.Row]) -> list[str]:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        "| preset | train: params | grads | AdamW | activations | total | XLA | serve: params | "
        "KV cache | total | XLA | train / serve |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        xt, xs = r["xla_train_footprint"], r["xla_serve_footprint"]
        lines.append(
            f"| {r['preset']} | {gib(r['train_params'])} | {gib(r['train_grads'])} | "
            f"{gib(r['train_adam'])} | {gib(r['train_activations'])} | {gib(r['train_total'])} | "
            f"{gib(xt) if xt else '-'} | {gib(r['serve_params'])} | {gib(r['serve_kv_cache'])} | "
            f"{gib(r['serve_total'])} | {gib(xs) if xs else '-'} | "
            f"{r['train_total'] / r['serve_total']:.1f}x |"
        )
    lines += [
        "",
        f"Batch {rows[0]['batch']}, T = S = min(1024, context). Analytic train memory follows the "
        "source article (params × bytes + grads × 4 + AdamW 2 × 4 per parameter + activations), "
        "with the activation count derived from what a step saves (jaxllm.analytic). XLA's footprint "
        "is argument + output − alias + temp of the program compiled with donation; its gap to the "
        "analytic total is the workspace XLA adds (fusion buffers, the loss's [B, T, V] logits).",
        "",
        "![memory](memory.png)",
        "",
        "Remat policies (train step):",
        "",
        "| remat | activations (analytic) | XLA temp | FLOPs (analytic) | FLOPs (XLA) |",
        "|---|---|---|---|---|",
    ]
    for r in remat:
        lines.append(
            f"| {r['remat']} | {si(r['analytic_activation_bytes'], 'B')} | "
            f"{si(r['xla_temp_bytes'], 'B')} | {si(r['analytic_flops'], 'FLOP')} | "
            f"{si(r['xla_flops'], 'FLOP')} |"
        )
    lines += ["", "![remat](remat.png)", "", "![kv cache](kv_cache.png)"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
