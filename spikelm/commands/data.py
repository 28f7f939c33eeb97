"""``spikelm data ...``: commands that build data sets. Each lives in its own module with ``register_data``."""

from __future__ import annotations

import importlib

# modules under spikelm.commands adding `spikelm data` subcommands
DATA_COMMANDS = ("data_glue",)


def register(sub) -> None:
    p = sub.add_parser("data", help="build data sets (see `spikelm data --help`)",
                       description="Build data sets from package sources.")
    data_subparsers = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_subparsers.required = True
    for name in DATA_COMMANDS:
        importlib.import_module(f"spikelm.commands.{name}").register_data(data_subparsers)
