"""The error type for mistakes in what a user asked for (the bottom layer: anything may raise it)."""

import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def loading_in_one_line(directory, flag: str = "--model"):
    """Around a ``from_pretrained`` of a user's directory, every failure becomes one line naming the directory (or
    the file) and the reason: a ``.bin``/``.pt`` file that ``torch.load(weights_only=True)`` refuses (it holds
    Python objects; torch's own message would suggest ``weights_only=False``), a damaged ``.safetensors`` file
    (e.g. truncated), and anything else ``from_pretrained`` raises on what it reads (a config field out of range
    or of the wrong type, an unknown format version, tensors of the wrong shape, no weights file)."""
    path = Path(str(directory))

    def files(*suffixes) -> str:
        found = sorted(p.name for p in path.glob("*") if p.suffix in suffixes) if path.is_dir() else []
        return f"{path}/{found[0]}" if len(found) == 1 else f"{path} ({', '.join(found)})" if found else str(path)

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            yield
    except pickle.UnpicklingError:
        raise RefusedPickleError(f"{flag} {refused_pickle(files('.bin', '.pt', '.pth'))}") from None
    except UserError:
        raise
    except Exception as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        if type(err).__name__ == "SafetensorError":  # safetensors' own type, not imported here
            raise UserError(
                f"{flag} {files('.safetensors')} cannot be read ({reason}): a damaged or truncated safetensors file; "
                "save the model again"
            ) from None
        raise UserError(f"{flag} {path} cannot be loaded: {reason}") from None
