"""The error type for mistakes in what a user asked for (the bottom layer: anything may raise it)."""


class UserError(Exception):
    """An error caused by the command's input: ``spikelm`` prints it as one line and exits with status 2."""
