"""The ``spikelm`` command line. Each subcommand lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

from spikelm.errors import UserError

# modules under spikelm.commands, each adding one or more subcommands
COMMANDS = (
    "benchmark",
    "convert",
    "data",
    "demo",
    "distill",
    "energy",
    "finetune",
    "generate",
    "glue",
    "perplexity",
    "pretrain",
    "reproduce",
    "spikify",
)


def add_output_dir(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--output-dir", required=required, help="directory to write into (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="write into --output-dir even if it holds other files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikelm", description="Spike-driven language models (SpikeLM).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"spikelm.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"spikelm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
