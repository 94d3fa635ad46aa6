"""The ``jaxllm`` command: a subcommand per job; bad input exits non-zero with one readable line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from collections.abc import Callable, Sequence

from jaxllm.config import PRESETS, ModelConfig, apply_overrides, get_preset

Command = Callable[[argparse.Namespace], int]


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "small") -> None:
    """The flags every command that builds a model shares: --preset and repeatable --override."""
    parser.add_argument(
        "--preset",
        default=default_preset,
        help=f"model preset, one of: {', '.join(PRESETS)} (default: {default_preset})",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one ModelConfig field, e.g. n_layers=4 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    return apply_overrides(get_preset(args.preset), args.override)


def cmd_info(args: argparse.Namespace) -> int:
    from jaxllm.model import count_params

    config = config_from_args(args)
    params = count_params(config)
    if args.json:
        print(json.dumps({"preset": args.preset, "config": config.to_dict(), "params": params}))
        return 0
    print(f"preset {args.preset}")
    for name, value in config.to_dict().items():
        print(f"  {name:<14} {value}")
    print(f"  {'head_dim':<14} {config.head_dim}  (derived)")
    print(f"  {'groups':<14} {config.groups}  (derived)")
    print("parameters")
    for name, value in params.items():
        print(f"  {name:<14} {value:>15,}")
    return 0


def _info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a config and its parameter count (allocates nothing)")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxllm import loop

    names = [f.name for f in dataclasses.fields(loop.TrainSettings)]
    requested = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    summary = loop.train(
        args.out, preset=args.preset, overrides=args.override, resume=args.resume, **requested
    )
    print(loop.describe_summary(summary))
    stopped = summary["stopped_by"]
    return 128 + signal.Signals[stopped].value if stopped else 0


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a text corpus (default: `small` on the built-in corpus)",
        description="Train with AdamW; checkpoints, metrics.jsonl and summary.json go to --out. "
        "With --resume, settings not given are taken from the checkpoint and those given must "
        "match it (except the evaluation, checkpoint, logging and --data options).",
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
    p.add_argument("--out", default="runs/small", help="run directory (default: runs/small)")
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
        "--seed", **int_opt, help="seed of the initial parameters and batch order (default: 0)"
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
    p.set_defaults(func=cmd_train)


# Each entry adds one subcommand's parser (and its handler through set_defaults(func=...)).
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_info_parser, _train_parser]


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
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"jaxllm: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError | ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
