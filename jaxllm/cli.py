"""The ``jaxllm`` command: a subcommand per job. Exit status (``jaxllm.errors``): 0 success; 2 bad input,
one line; 1 a run that failed on its own, one line; 128 + N after signal N (130 on Ctrl-C)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxllm.config import PRESETS, DType, ModelConfig, apply_overrides, get_preset
from jaxllm.errors import (
    InputError,
    RunError,
    directory_arg,
    file_arg,
    output_file_arg,
    positive_arg,
    utf8_text,
)
from jaxllm.launch import interrupted

MAX_SEED = 2**32 - 1  # jax.random.key takes seeds modulo 2**32: a larger one would alias a smaller

Command = Callable[[argparse.Namespace], int]


class UsageError(InputError):
    """Bad command-line input; printed as one line, exit status 2."""


def add_model_args(
    parser: argparse.ArgumentParser, default_preset: str = "small"
) -> argparse._MutuallyExclusiveGroup:
    """The flags every command that builds a model shares: --preset or --hf-dir, and repeatable
    --override. Returns the group of the model's sources, one of which a command may take."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        default=default_preset,
        help=f"model preset, one of: {', '.join(PRESETS)} (default: {default_preset})",
    )
    source.add_argument(
        "--hf-dir",
        metavar="DIR",
        help="a local Hugging Face checkpoint (config.json + safetensors) of the GPT-2, Llama or Qwen2 "
        "family",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one ModelConfig field, e.g. n_layers=4 (repeatable)",
    )
    return source


def add_phase_args(parser: argparse.ArgumentParser) -> None:
    """The model flags (``add_model_args``) and the phase's: --phase, --batch, --seq."""
    add_model_args(parser)
    parser.add_argument("--phase", required=True, help="train, prefill or decode")
    parser.add_argument("--batch", type=positive_arg, required=True, help="B: sequences per call")
    parser.add_argument(
        "--seq",
        type=positive_arg,
        required=True,
        help="T: tokens per sequence (decode: the context the step completes, <= max_len)",
    )


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The config of --hf-dir (reading config.json only) or of --preset, with --override applied."""
    if getattr(args, "hf_dir", None):
        from jaxllm.hf import load_config

        return load_config(args.hf_dir, args.override)
    return apply_overrides(get_preset(args.preset), args.override)


def _seed(text: str) -> int:
    """argparse type: an integer seed in [0, MAX_SEED]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {MAX_SEED}], got {value}")
    return value


def cmd_info(args: argparse.Namespace) -> int:
    from jaxllm import analytic, serve
    from jaxllm.model import count_params

    config = config_from_args(args)
    params = count_params(config)
    seq = args.seq or config.max_len
    if seq > config.max_len:
        raise UsageError(f"--seq {seq} is beyond the context length max_len={config.max_len}")
    memory = {
        "batch": args.batch,
        "seq": seq,
        "train": analytic.train_memory(config, args.batch, seq),
        "serve": serve.serving_memory(config, args.batch, seq),
    }
    kv_per_token = analytic.kv_bytes_per_token(config)
    if args.json:
        source = {"preset": None, "hf_dir": args.hf_dir} if args.hf_dir else {"preset": args.preset}
        out = {**source, "config": config.to_dict(), "params": params}
        print(json.dumps({**out, "memory": memory, "kv_bytes_per_token": kv_per_token}))
        return 0
    print(f"hf_dir {args.hf_dir}" if args.hf_dir else f"preset {args.preset}")
    for name, value in config.to_dict().items():
        print(f"  {name:<21} {value}")
    print(f"  {'head_dim':<21} {config.head_dim}  (derived)")
    print(f"  {'groups':<21} {config.groups}  (derived)")
    print("parameters")
    for name, value in params.items():
        print(f"  {name:<14} {value:>15,}")
    for kind in ("train", "serve"):
        print(f"{kind} memory at batch {args.batch}, seq {seq} (bytes)")
        for name, value in memory[kind].items():
            print(f"  {name:<14} {value:>15,}")
    print(f"kv bytes/token {kv_per_token:>15,}")
    return 0


def _info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a config and its parameter count (allocates nothing)")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch", type=positive_arg, default=1, help="batch of the memory figures")
    p.add_argument(
        "--seq", type=positive_arg, help="sequence length of the memory figures (max_len)"
    )
    p.set_defaults(func=cmd_info)


def _label(args: argparse.Namespace) -> str:
    """What the model is called in output: its preset, or the Hugging Face directory it came from."""
    return getattr(args, "hf_dir", None) or args.preset


def add_process_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that may run as one of many processes (``jaxllm.distributed``)."""
    group = parser.add_argument_group(
        "many processes", "each process runs the same command with its own --process-id"
    )
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address for jax.distributed (default: $JAX_COORDINATOR_ADDRESS, or the "
        "Slurm / Open MPI environment; none of these: one process)",
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")


def start_processes(args: argparse.Namespace) -> None:
    """``jax.distributed`` started as the process flags ask (nothing without them)."""
    from jaxllm import distributed

    processes = distributed.Processes(args.coordinator, args.num_processes, args.process_id)
    distributed.initialize(processes)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxllm import distributed, loop
    from jaxllm.mesh import parse_mesh

    names = [f.name for f in dataclasses.fields(loop.TrainSettings)]
    requested = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    mesh = None if args.mesh is None else parse_mesh(args.mesh)
    start_processes(args)
    summary = loop.train(
        args.out,
        preset=args.preset,
        hf_dir=args.hf_dir,
        overrides=args.override,
        resume=args.resume,
        mesh=mesh,
        **requested,
    )
    if distributed.is_primary():
        print(loop.describe_summary(summary))
    stopped = summary["stopped_by"]
    return 128 + signal.Signals[stopped].value if stopped else 0


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a text corpus (default: `small` on the built-in corpus)",
        description="Train with AdamW; checkpoints, metrics.jsonl and summary.json go to --out. "
        "With --hf-dir, fine-tune that checkpoint: its weights, its tokenizer.json (copied into "
        "--out) and config; --override may change only dtype, param_dtype, scan_layers, scan_unroll, remat. "
        "With --resume, settings not given are taken from the checkpoint and those given must "
        "match it (except the evaluation, checkpoint, logging and --data options; the mesh "
        "may differ too).",
    )
    add_model_args(p)
    p.set_defaults(preset=None)  # None: small, or the checkpoint's config with --resume
    int_opt = {"type": int, "default": None}
    p.add_argument("--steps", **int_opt, help="optimizer updates in the run (default: 300)")
    p.add_argument("--batch", **int_opt, help="B, sequences per update (default: 16)")
    p.add_argument("--seq", **int_opt, help="T, tokens per sequence (default: 128)")
    p.add_argument(
        "--data",
        default=None,
        help="text file or directory (default: the built-in "
        "corpus, the Python standard library's top-level .py files)",
    )
    p.add_argument(
        "--out",
        type=directory_arg,
        default="runs/small",
        help="run directory (default: runs/small)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3)")
    p.add_argument("--warmup", **int_opt, help="linear warm-up steps (default: steps / 10)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW decay of weight matrices (default: 0.1)",
    )
    p.add_argument(
        "--clip-norm", type=float, default=None, help="global gradient norm clip (default: 1.0)"
    )
    p.add_argument("--accum", **int_opt, help="micro-batches per update, dividing B (default: 1)")
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help=f"seed of the initial parameters and batch order, 0 to {MAX_SEED} (default: 0)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of the corpus held out for validation (default: 0.1)",
    )
    p.add_argument("--eval-every", **int_opt, help="steps between validation losses (default: 50)")
    p.add_argument(
        "--eval-batches", **int_opt, help="validation batches of B sequences (default: 4)"
    )
    p.add_argument("--ckpt-every", **int_opt, help="steps between checkpoints (default: 100)")
    p.add_argument("--keep", **int_opt, help="checkpoints kept (default: 3)")
    p.add_argument(
        "--log-every",
        **int_opt,
        help="steps between log lines when stderr is not a terminal (default: 10)",
    )
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        type=directory_arg,
        help="also write the metrics as TensorBoard scalars to DIR",
    )
    p.add_argument(
        "--mesh",
        metavar="AXES",
        help="train on a device mesh, e.g. data=2,fsdp=2,tensor=2 (sizes multiply to the device "
        "count of all processes; default: one device)",
    )
    add_process_args(p)
    p.set_defaults(func=cmd_train)


def add_mesh_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--mesh",
        metavar="AXES",
        help="shard over a device mesh, e.g. data=2,fsdp=2,tensor=2 (sizes multiply to the device "
        f"count; default: one device){note}",
    )


def mesh_from_args(args: argparse.Namespace) -> Any:
    """The ``--mesh`` (a ``jax.sharding.Mesh``), or None for one device; InputError on a bad one."""
    if args.mesh is None:
        return None
    from jaxllm.mesh import make_mesh, parse_mesh

    return make_mesh(parse_mesh(args.mesh))


def cmd_analyze(args: argparse.Namespace) -> int:
    from jaxllm import measure, phases, tables, train

    config = config_from_args(args)
    phases.check_sizes(config, args.phase, args.batch, args.seq)
    if args.mesh is not None:
        return _analyze_sharded(args, config)
    if args.phase == "train":  # the program `jaxllm train` compiles here (layers unrolled or not)
        config = train.training_config(config, args.override)
    row = measure.analyze_phase(
        config, args.phase, args.batch, args.seq, args.measure, args.quick, _label(args)
    )
    print(json.dumps(row.to_json()) if args.json else "\n".join(tables.analysis_table(row)))
    return 0


def _analyze_sharded(args: argparse.Namespace, config: ModelConfig) -> int:
    from jaxllm import hardware, sharded
    from jaxllm.mesh import check_divides

    mesh = mesh_from_args(args)
    check_divides(mesh, config, args.batch)  # before calibrating: a bad mesh is a one-line error
    calibration = hardware.calibrate(quick=args.quick)
    row = sharded.analyze(config, mesh, args.phase, args.batch, args.seq, calibration, args.measure)
    print(json.dumps(row) if args.json else "\n".join(sharded.table(row)))
    return 0


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="one phase three ways (analytic, XLA, measured) on the roofline"
    )
    add_phase_args(p)
    p.add_argument("--measure", action="store_true", help="also time it (allocates the model)")
    p.add_argument("--quick", action="store_true", help="quick calibration, fewer repeats")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_mesh_arg(p)
    p.set_defaults(func=cmd_analyze)


def cmd_profile(args: argparse.Namespace) -> int:
    from jaxllm import opprofile

    config = config_from_args(args)
    cell = (args.phase, args.batch, args.seq, args.calls)
    result = opprofile.profile_phase(config, *cell, args.override, args.trace_dir)
    if args.json:
        print(json.dumps(result.to_json(args.top)))
    else:
        print("\n".join(opprofile.table(result, args.top)))
    return 0


def _profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="where one phase's time goes, op by op (a profile of a few calls)",
        description="Runs --calls calls of the phase `analyze` compiles under JAX's profiler and "
        "shares each instant of wall time among the ops running then (two CPU threads' ops are not "
        "counted twice): time a call by op kind and the ops of most time, with their HLO lines.",
    )
    add_phase_args(p)
    p.add_argument("--calls", type=positive_arg, default=5, help="calls profiled (default: 5)")
    p.add_argument(
        "--top", type=positive_arg, default=15, help="kinds and ops listed (default: 15)"
    )
    p.add_argument(
        "--trace-dir",
        type=lambda text: Path(directory_arg(text)),
        metavar="DIR",
        help="keep the profiler's trace there (open it in TensorBoard or ui.perfetto.dev)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_profile)


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxllm import bench, hardware, tables

    for preset in args.presets:  # every name checked before anything is compiled
        get_preset(preset)
    rows = bench.compile_rows(args.presets, args.batches, args.quick)  # each checked to fit
    calibration = hardware.calibrate(quick=args.quick)
    print(json.dumps({"calibration": calibration}) if args.json else tables.header(calibration))
    for row in bench.bench(rows, args.quick):
        print(json.dumps(row.to_json()) if args.json else tables.table_row(row), flush=True)
    return 0


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="train, prefill and decode of presets beside their roofline")
    p.add_argument(
        "--presets", nargs="+", default=["small", "gpt2"], help="presets (default: small gpt2)"
    )
    p.add_argument(
        "--batches",
        nargs="+",
        type=positive_arg,
        default=[1, 8, 32, 128],
        help="decode batch sizes (default: 1 8 32 128)",
    )
    p.add_argument("--quick", action="store_true", help="short shapes, quick calibration")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=cmd_bench)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from jaxllm import hardware, tables

    calibration = hardware.calibrate(refresh=args.refresh, quick=args.quick)
    print(json.dumps(calibration) if args.json else tables.header(calibration).splitlines()[0])
    return 0


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure this device's matmul FLOP/s and copy bandwidth (cached per device)",
        description="Prints the cached calibration of this device, measuring it when there is none "
        "(or with --refresh). Calibrate on a quiet machine: every roofline uses these peaks.",
    )
    p.add_argument("--refresh", action="store_true", help="measure again, replacing the cache")
    p.add_argument("--quick", action="store_true", help="small shapes (about a second)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_calibrate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, or the lines of --prompts-file: split on newlines only (\\n, \\r\\n, \\r), so a
    form feed or U+2028 inside a prompt stays in it. Prompts are UTF-8 text (InputError otherwise:
    raw bytes of a byte-level checkpoint go as --prompt-ids)."""
    if args.prompt is not None:
        return [utf8_text("--prompt", args.prompt)]
    with open(args.prompts_file, "rb") as f:
        text = utf8_text(f"--prompts-file {args.prompts_file}", f.read())
    return text.replace("\r\n", "\n").replace("\r", "\n").removesuffix("\n").split("\n")


# Characters that would break the one-line-per-prompt plain output, and how they are written.
_ESCAPES = str.maketrans(
    {
        "\\": "\\\\",
        "\n": "\\n",
        "\r": "\\r",
        **{c: f"\\u{ord(c):04x}" for c in "\v\f\x1c\x1d\x1e\x85\u2028\u2029"},
    }
)


def one_line(text: str) -> str:
    """``text`` on one line: backslashes doubled, line breaks written as \\n, \\r or \\u and four hex digits."""
    return text.translate(_ESCAPES)


def _generation_model(args: argparse.Namespace) -> tuple[ModelConfig, Any, Any, tuple[int, ...]]:
    """(config, params, tokenizer or None, stop tokens) of --checkpoint (byte-level tokenizer, EOT)
    or --hf-dir (its tokenizer.json if any, its config.json's eos_token_id)."""
    if args.hf_dir:
        from jaxllm import hf
        from jaxllm.tokenizer import load_hf_tokenizer

        config, params = hf.load(args.hf_dir, args.override)
        stop = hf.eos_ids(args.hf_dir, config.vocab_size)
        return config, params, load_hf_tokenizer(args.hf_dir, config.vocab_size), stop
    if args.override:
        raise UsageError("--override applies to --hf-dir (a jaxllm checkpoint keeps its config)")
    from jaxllm import checkpoint, data

    config, params = checkpoint.load_params(args.checkpoint, warn=_warn)
    return config, params, data, (data.EOT,)


def _warn(message: str) -> None:
    print(f"jaxllm: warning: {message}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    import jax

    from jaxllm.generate import generate
    from jaxllm.sampling import Sampler
    from jaxllm.tokenizer import parse_ids

    sampler = Sampler(args.temperature, args.top_k, args.top_p)
    mesh = mesh_from_args(args)
    config, params, tokenizer, stop = _generation_model(args)
    if args.prompt_ids is not None:
        texts, prompts = [args.prompt_ids], [parse_ids(args.prompt_ids, config.vocab_size).tolist()]
    elif tokenizer is None:
        raise UsageError(f"{args.hf_dir} has no tokenizer.json: give the prompt as --prompt-ids")
    else:
        texts = _read_prompts(args)
        prompts = [tokenizer.encode(t).tolist() for t in texts]
    key = jax.random.key(args.seed)
    gen = generate(config, params, prompts, args.max_new_tokens, sampler, key, stop, mesh)
    if tokenizer is None:
        outputs = [",".join(map(str, t)) for t in gen.tokens]
    else:
        outputs = [tokenizer.decode(t) for t in gen.tokens]
    if not args.json:
        print("\n".join(map(one_line, outputs)))
        return 0
    results = [
        {"prompt": p, "text": o, "tokens": t, "stopped": s}
        for p, o, t, s in zip(texts, outputs, gen.tokens, gen.stopped, strict=True)
    ]
    timing = {
        "compile_s": gen.compile_s,
        "prefill_s": gen.prefill_s,
        "decode_s": gen.decode_s,
        "decode_steps": gen.decode_steps,
        "decode_tokens_per_s": gen.decode_tokens_per_s,
    }
    print(json.dumps({"results": results, "timing": timing}))
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint", metavar="DIR", help="a jaxllm run directory (byte-level tokenizer)"
    )
    model.add_argument(
        "--hf-dir",
        metavar="DIR",
        help="a local Hugging Face GPT-2/Llama checkpoint (its tokenizer.json, if any)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="with --hf-dir: change a numeric field, e.g. param_dtype=bfloat16 (repeatable)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt")
    src.add_argument(
        "--prompts-file",
        metavar="FILE",
        type=file_arg,
        help="one prompt per line, run as one left-padded batch",
    )
    src.add_argument("--prompt-ids", metavar="IDS", help="one prompt as token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="(default: 64)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="0 = greedy, as is anything below 1e-6 (default: 1.0)",
    )
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: smallest set with mass p")
    p.add_argument(
        "--seed", type=_seed, default=0, help=f"sampling seed, 0 to {MAX_SEED} (default: 0)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_mesh_arg(p, "; data x fsdp must divide the prompts")
    p.set_defaults(func=cmd_generate)


def _served_config(args: argparse.Namespace) -> ModelConfig:
    """The config of --checkpoint (its metadata), --hf-dir or --preset, read without the weights:
    what ``engine.check_memory`` sizes before they are loaded."""
    if not args.checkpoint:
        return config_from_args(args)
    if args.override:
        raise UsageError(
            "--override does not apply to --checkpoint (a checkpoint keeps its config)"
        )
    from jaxllm import checkpoint

    return checkpoint.config_from_meta(checkpoint.load_meta(args.checkpoint), args.checkpoint)


def _serve_bench_model(args: argparse.Namespace) -> tuple[ModelConfig, Any]:
    """--checkpoint's or --hf-dir's weights, or a preset's with deterministic filler weights (the
    engine's speed does not depend on their values)."""
    if args.checkpoint:
        from jaxllm import checkpoint

        return checkpoint.load_params(args.checkpoint, warn=_warn)
    if args.hf_dir:
        from jaxllm import hf

        return hf.load(args.hf_dir, args.override)
    from jaxllm.model import param_shapes
    from jaxllm.phases import filler_params

    config = config_from_args(args)
    return config, filler_params(param_shapes(config))


def _serve_bench_trace(args: argparse.Namespace, capacity: int) -> list[Any]:
    """--trace's requests or a seeded trace of --requests, checked to fit in host memory with their
    replay (each request holds at most ``capacity`` tokens: the engine refuses longer ones)."""
    from jaxllm import servebench, traces

    if args.trace:
        trace = traces.load_trace(args.trace)
        longest = max(r.prompt_len + r.output_len for r in trace)
        servebench.check_memory(len(trace), min(longest, capacity))
        return trace
    prompts = traces.parse_lengths(args.prompt_lens)
    outputs = traces.parse_lengths(args.output_lens)
    servebench.check_memory(args.requests, min(max(prompts) + max(outputs), capacity))
    return traces.make_trace(args.requests, args.rate, prompts, outputs, seed=args.seed)


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from jaxllm import hardware, servebench, traces
    from jaxllm.engine import POLICIES, check_memory

    policies = args.policy.split(",")
    for name in policies:  # every name checked before anything is compiled
        if name not in POLICIES:
            raise InputError(f"unknown policy {name!r}; policies are: {', '.join(POLICIES)}")
    mesh = mesh_from_args(args)
    config = _served_config(args)
    capacity = args.capacity or config.max_len
    check_memory(config, args.slots, capacity, mesh)
    trace = _serve_bench_trace(args, capacity)
    config, params = _serve_bench_model(args)
    if args.save_trace:
        traces.save_trace(args.save_trace, trace)
    peaks = hardware.roofline_peaks(hardware.calibrate(), config.dtype)
    runs = [_serve_bench_run(args, p, config, params, trace, peaks, mesh) for p in policies]
    if args.json:
        print(json.dumps({"runs": runs}))
        return 0
    for summary in runs:
        print("\n".join(servebench.summary_lines(summary)))
        for line in summary["refusals"]:
            print(f"refused {line}")
    for summary in runs[1:]:
        ratio = summary["tokens_per_s"] / runs[0]["tokens_per_s"]
        print(f"{summary['policy']}: {ratio:.2f}x the tokens/s of {runs[0]['policy']}")
    return 0


def _serve_bench_run(
    args: argparse.Namespace,
    policy: str,
    config: ModelConfig,
    params: Any,
    trace: Any,
    peaks: Any,
    mesh: Any,
) -> dict[str, Any]:
    """One policy's replay of ``trace`` on a fresh engine: ``servebench.summarize`` and more."""
    from jaxllm import servebench
    from jaxllm.engine import Engine

    engine = Engine(
        config,
        params,
        slots=args.slots,
        capacity=args.capacity,
        policy=policy,
        chunk=args.chunk,
        mesh=mesh,
    )
    longest = min(max(r.prompt_len for r in trace), engine.capacity - 1)
    compile_s = engine.compile_programs(longest)
    run = servebench.replay(engine, trace, args.seed)
    summary = servebench.summarize(engine, run)
    summary.update(
        compile_s=compile_s,
        programs_compiled=len(engine.compiled),
        refusals=run.refused,
        programs=servebench.programs(engine, run, peaks),
    )
    return summary


def _serve_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-bench",
        help="replay a request trace through the serving engine (throughput, TTFT, TBT)",
        description="A seeded trace (Poisson arrivals, uniform lengths) or --trace FILE runs through "
        "the engine in real time. A preset runs with deterministic filler weights.",
    )
    source = add_model_args(p)
    source.add_argument("--checkpoint", metavar="DIR", help="a jaxllm run directory's weights")
    p.add_argument(
        "--policy",
        default="continuous",
        help="static, continuous or chunked, or several separated by commas (one run each, same "
        "trace; ratios to the first)",
    )
    p.add_argument("--slots", type=positive_arg, default=8, help="B, requests decoded at once (8)")
    p.add_argument("--chunk", type=positive_arg, default=64, help="chunked: prompt tokens per step")
    add_mesh_arg(p, "; the engine shards over tensor only")
    p.add_argument("--capacity", type=positive_arg, help="positions per slot (default: max_len)")
    p.add_argument("--rate", type=float, default=float("inf"), help="requests/s (default: inf)")
    p.add_argument("--requests", type=positive_arg, default=64, help="requests in the trace (64)")
    p.add_argument("--prompt-lens", default="16-128", help="LO-HI uniform or a,b,c (16-128)")
    p.add_argument("--output-lens", default="16-256", help="LO-HI uniform or a,b,c (16-256)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the trace and its prompts")
    p.add_argument(
        "--trace", metavar="FILE", type=file_arg, help="replay this JSON Lines trace instead"
    )
    p.add_argument(
        "--save-trace", metavar="FILE", type=output_file_arg, help="write the trace as JSON Lines"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_serve_bench, preset="small")


def cmd_export(args: argparse.Namespace) -> int:
    from jaxllm import export

    files = export.export_run(args.checkpoint, args.out, args.dtype, warn=_warn)
    print(f"{args.out}: {', '.join(files)}")
    return 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run as a Hugging Face checkpoint (config.json, safetensors, tokenizer)",
        description="Write the newest step of --checkpoint that loads into --out in the Hugging "
        "Face layout (GPT-2, Llama or Qwen2, by the model's config): config.json, model.safetensors "
        "(shards of at most 5 GB with model.safetensors.index.json past that) and the tokenizer (a "
        "fine-tuned run's copy of its checkpoint's, or a byte-level tokenizer.json). --out must be "
        "new or empty: an existing non-empty directory is refused, never overwritten.",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN", type=directory_arg, help="a run")
    p.add_argument(
        "--out", required=True, metavar="DIR", type=directory_arg, help="a new directory"
    )
    p.add_argument(
        "--dtype",
        choices=typing.get_args(DType),
        default=None,
        help="dtype of the stored tensors (default: the run's param_dtype)",
    )
    p.set_defaults(func=cmd_export)


def cmd_serve(args: argparse.Namespace) -> int:
    from jaxllm import server
    from jaxllm.engine import POLICIES, Engine, check_memory
    from jaxllm.server_service import Limits, ServedModel

    if args.policy not in POLICIES:
        raise UsageError(f"unknown policy {args.policy!r}; policies are: {', '.join(POLICIES)}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    limits = Limits(args.max_queue, args.max_body, args.shutdown_timeout)
    mesh = mesh_from_args(args)
    config = _served_config(args)
    check_memory(config, args.slots, config.max_len, mesh)
    try:  # before the model loads: an address in use or not of this host is bad input
        sock = server.bind(args.host, args.port)
    except OSError as err:
        raise UsageError(
            f"cannot listen on --host {args.host} --port {args.port}: {err.strerror or err}"
        ) from None
    with sock:
        config, params, tokenizer, stop = _generation_model(args)
        engine = Engine(
            config, params, slots=args.slots, policy=args.policy, chunk=args.chunk, mesh=mesh
        )
        model = ServedModel(args.checkpoint or args.hf_dir, tokenizer, stop)
        return server.serve(engine, model, limits, sock)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (POST /v1/completions) over the serving engine",
        description="Loads the model, compiles its programs, then reports ready (GET /health). "
        "SIGTERM or Ctrl-C: stop accepting, let running requests finish until --shutdown-timeout, "
        "cancel the rest.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint", metavar="DIR", help="a jaxllm run directory (byte-level tokenizer)"
    )
    model.add_argument("--hf-dir", metavar="DIR", help="a local Hugging Face checkpoint")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="with --hf-dir: change a numeric field, e.g. param_dtype=bfloat16 (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 for any (default: 8000)")
    p.add_argument(
        "--policy", default="chunked", help="static, continuous or chunked (default: chunked)"
    )
    p.add_argument("--slots", type=positive_arg, default=8, help="B, requests batched (default: 8)")
    p.add_argument(
        "--chunk",
        type=positive_arg,
        default=64,
        help="chunked: prompt tokens per step (default: 64)",
    )
    add_mesh_arg(p, "; the engine shards over tensor only")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting beyond the slots before 429 (default: 64)",
    )
    p.add_argument(
        "--max-body", type=positive_arg, default=2**20, help="request body bytes (default: 1 MiB)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds running requests get after SIGTERM before they are cancelled (default: 10)",
    )
    p.set_defaults(func=cmd_serve)


# Each entry adds one subcommand's parser (and its handler through set_defaults(func=...)).
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _info_parser,
    _analyze_parser,
    _profile_parser,
    _bench_parser,
    _calibrate_parser,
    _train_parser,
    _generate_parser,
    _serve_bench_parser,
    _export_parser,
    _serve_parser,
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (RunError, OSError) as err:
        print(f"jaxllm: error: {err}", file=sys.stderr)
        return 1
    except InputError as err:
        print(f"jaxllm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training saves first (loop.stop_requests); anything else just stops
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
