"""Output directories that never clobber someone else's files, and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

MARKER = "spikelm_run.json"


class OutputDirError(ValueError):
    """An output directory that cannot be used as asked (the message says why and what to do)."""


def prepare_output_dir(path: str | Path, command: str, overwrite: bool = False, identity: dict | None = None) -> Path:
    """Create ``path`` for the output of ``command``, refusing a directory that holds something else.

    A non-empty directory is accepted only if it was written by the same command (and, when
    ``identity`` is given, the same run: e.g. the same model shape), or with ``overwrite=True``.
    Files already there are not deleted; the caller's writes replace its own files.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        marker = path / MARKER
        previous = None
        if marker.is_file():
            try:
                previous = json.loads(marker.read_text())
            except json.JSONDecodeError:
                previous = None
        if previous is None or previous.get("command") != command:
            what = (
                f"the output of `spikelm {previous['command']}`"
                if previous and "command" in previous
                else "other files"
            )
            raise OutputDirError(
                f"--output-dir {path} is not empty and holds {what}; choose another directory or pass --overwrite"
            )
        if identity is not None and previous.get("identity") not in (None, identity):
            raise OutputDirError(
                f"--output-dir {path} holds a different `spikelm {command}` run ({previous.get('identity')}); "
                "choose another directory or pass --overwrite"
            )
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / MARKER, {"command": command, "identity": identity})
    return path


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
