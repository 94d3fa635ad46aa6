"""The ``jaxllm`` command: a subcommand per job; bad input exits non-zero with one readable line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from jaxllm.config import PRESETS, ModelConfig, apply_overrides, get_preset

Command = Callable[[argparse.Namespace], int]


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "small") -> None:
    """The flags every command that builds a model shares: --preset or --hf-dir, and repeatable
    --override."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        default=default_preset,
        help=f"model preset, one of: {', '.join(PRESETS)} (default: {default_preset})",
    )
    source.add_argument(
        "--hf-dir",
        metavar="DIR",
        help="a local Hugging Face checkpoint (config.json + safetensors) of the GPT-2 or Llama family",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one ModelConfig field, e.g. n_layers=4 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The config of --hf-dir (reading config.json only) or of --preset, with --override applied."""
    if getattr(args, "hf_dir", None):
        from jaxllm.hf import load_config

        return load_config(args.hf_dir, args.override)
    return apply_overrides(get_preset(args.preset), args.override)


def cmd_info(args: argparse.Namespace) -> int:
    from jaxllm.model import count_params

    config = config_from_args(args)
    params = count_params(config)
    if args.json:
        source = {"preset": None, "hf_dir": args.hf_dir} if args.hf_dir else {"preset": args.preset}
        print(json.dumps({**source, "config": config.to_dict(), "params": params}))
        return 0
    print(f"hf_dir {args.hf_dir}" if args.hf_dir else f"preset {args.preset}")
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


# Each entry adds one subcommand's parser (and its handler through set_defaults(func=...)).
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_info_parser]


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
