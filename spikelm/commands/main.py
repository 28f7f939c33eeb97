"""The ``spikelm`` command line. Each subcommand lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

from spikelm.errors import UserError

from .argtypes import Parser

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
    "serve",
    "spikify",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="spikelm", description="Spike-driven language models (SpikeLM).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"spikelm.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A :class:`UserError` (bad input: the argument types and the library's validation
    points raise it) is one line ``spikelm CMD: error: ...`` and exit status 2; anything else is a bug and keeps
    its traceback. Output directories the command prepared are released at the end, and removed if it failed
    before writing anything into a directory it created."""
    from spikelm.outputs import is_main_process, release_output_dirs

    parser = build_parser()
    try:  # argparse's refusals (one line, see argtypes.Parser) are a status, as the command's own errors
        args, extra = parser.parse_known_args(argv)
        if extra:  # refused by the subcommand's parser, so that the line names the subcommand
            _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    failed = True
    try:
        is_main_process()  # a malformed RANK / WORLD_SIZE is refused before any launcher reads it
        _check_switches()
        status = int(args.func(args) or 0)
        failed = status != 0
        return status
    except UserError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"spikelm {_command_name(args)}: error: {message}", file=sys.stderr)
        return 2
    finally:
        release_output_dirs(failed=failed)


def _check_switches() -> None:
    """The environment's kernel and decoding-step switches, where set, read once before any work: a bad value is the
    command's one line (a :class:`UserError`) rather than an error at the first spiking layer."""
    import os

    if any(name.startswith("SPIKELM_") and "KERNELS" in name for name in os.environ):  # the dispatcher's switches
        from spikelm.nn import kernels

        kernels.enabled()
        kernels.max_rows()
    if os.environ.get("SPIKELM_DECODE_STEP") is not None:
        from spikelm.conversion import decode_step

        decode_step.enabled()


def _subparser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    for name in ("command", "data_command"):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or getattr(args, name, None) not in actions[0].choices:
            break
        parser = actions[0].choices[getattr(args, name)]
    return parser


def _command_name(args) -> str:
    sub = getattr(args, "data_command", None)
    return f"{args.command} {sub}" if sub else args.command


if __name__ == "__main__":
    sys.exit(main())
