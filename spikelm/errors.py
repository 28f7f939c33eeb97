"""The error type for mistakes in what a user asked for (the bottom layer: anything may raise it)."""


class UserError(ValueError):
    """An error caused by the command's input: ``spikelm`` prints it as one line and exits with status 2.

    It subclasses ``ValueError`` so that library callers' ``except ValueError`` keeps working; ``spikelm``
    itself catches only ``UserError``, so an internal ``ValueError`` (a bug) keeps its traceback.
    """


class RefusedPickleError(UserError):
    """A file that ``torch.load(weights_only=True)`` refuses: it holds Python objects, not only tensors."""


def refused_pickle(path, err: Exception | None = None) -> RefusedPickleError:
    """The one-line refusal for a pickle that holds more than tensors. torch's own message is not repeated:
    it suggests loading the file anyway, which spikelm never does."""
    return RefusedPickleError(
        f"refused to load {path}: it holds Python objects besides tensors (a pickle that could run code); "
        "spikelm reads only plain tensors from .bin/.pt files: re-save the weights as safetensors"
    )


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user named that is not there (still a ``FileNotFoundError`` for library callers)."""
