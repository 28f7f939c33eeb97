"""Subcommands of the ``spikelm`` command line (see :mod:`spikelm.commands.main`)."""
