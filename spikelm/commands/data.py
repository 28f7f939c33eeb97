"""``spikelm data ...``: the data subcommands. Each module named in ``DATA_COMMANDS`` adds its own
with ``register_data(subparsers)``."""

from __future__ import annotations

import importlib

# modules under spikelm.commands adding `spikelm data` subcommands
DATA_COMMANDS = ("data_corpus", "data_brown", "data_glue")


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="prepare corpora and fine-tuning data sets (see `spikelm data --help`)",
        description="Prepare pretraining corpora and fine-tuning data sets from package sources.",
    )
    data_subparsers = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_subparsers.required = True
    for name in DATA_COMMANDS:
        importlib.import_module(f"spikelm.commands.{name}").register_data(data_subparsers)
