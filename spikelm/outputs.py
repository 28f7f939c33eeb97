"""Output directories that never clobber someone else's files, one writer per directory, and atomic writes.

Every writing command passes through :func:`prepare_output_dir`, which is therefore the one place that
(1) refuses a directory holding something else, (2) takes an exclusive ``filelock.FileLock`` on
``DIR/.spikelm.lock`` held until :func:`release_output_dirs` (``spikelm`` calls it when the command ends) or the
process exits (the lock is an OS file lock: a process that dies releases it, so a stale lock is simply taken
over), writing the holder's pid to ``DIR/.spikelm.lock.pid`` so that a second writer can name it, and (3)
remembers whether it created the directory, so that a command that fails before writing anything leaves no new
directory behind (:func:`release_output_dirs` with ``failed=True``). Under ``torchrun``/``accelerate launch``
only the main process (``RANK`` 0) locks, for the whole job.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from spikelm.errors import UserError


def cache_dir() -> Path:
    """spikelm's cache: ``$SPIKELM_CACHE``, else ``$XDG_CACHE_HOME/spikelm``, else ``~/.cache/spikelm``."""
    if os.environ.get("SPIKELM_CACHE"):
        return Path(os.environ["SPIKELM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spikelm"


MARKER = "spikelm_run.json"
LOCK_FILE = ".spikelm.lock"
PID_FILE = ".spikelm.lock.pid"
_BOOKKEEPING = (LOCK_FILE, PID_FILE)

# directories prepared by this process: path -> (lock or None, created by us)
_HELD: dict[Path, tuple[object, bool]] = {}


class OutputDirError(UserError):
    """An output directory that cannot be used as asked (the message says why and what to do)."""


def prepare_output_dir(path: str | Path, command: str, overwrite: bool = False, identity: dict | None = None) -> Path:
    """Create ``path`` for the output of ``command``, refusing a directory that holds something else.

    A non-empty directory is accepted only if it was written by the same command (and, when
    ``identity`` is given, the same run: e.g. the same model shape), or with ``overwrite=True``.
    Files already there are not deleted; the caller's writes replace its own files.
    """
    if not str(path).strip():
        raise OutputDirError("--output-dir is empty; give a directory")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {path} exists and is not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"--output-dir {path} cannot be created: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        _forget(path, created)
        raise OutputDirError(f"--output-dir {path} is not writable")
    try:
        if not created:  # refuse someone else's directory before leaving so much as a lock file in it
            _check_contents(path, command, overwrite, identity)
        _lock(path, command, created)
        _check_contents(path, command, overwrite, identity)  # again, under the lock
    except BaseException:
        _release(path, failed=True)
        raise
    write_json_atomic(path / MARKER, {"command": command, "identity": identity})
    return path


def check_output_dir(path: str | Path, command: str, overwrite: bool = False, identity: dict | None = None) -> None:
    """:func:`prepare_output_dir`'s refusals, read-only (nothing created or locked): a command calls it before a
    long step so that a directory it will refuse is refused first."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {path} exists and is not a directory")
    if path.is_dir():
        _check_contents(path, command, overwrite, identity)


def _check_contents(path: Path, command: str, overwrite: bool, identity: dict | None) -> None:
    if any(p.name not in _BOOKKEEPING for p in path.iterdir()) and not overwrite:
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


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _lock(path: Path, command: str, created: bool) -> None:
    key = path.resolve()
    if key in _HELD:  # prepared twice by one process (e.g. a library call inside a command): one lock
        return
    lock = None
    if _is_main_process():
        from filelock import FileLock, Timeout

        lock = FileLock(str(path / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = (path / PID_FILE).read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise OutputDirError(
                f"--output-dir {path} is in use by another spikelm process (pid {holder}); wait for it to finish "
                "or choose another directory"
            ) from None
        write_text_atomic(path / PID_FILE, f"{os.getpid()}\n")
    _HELD[key] = (lock, created)


def _forget(path: Path, created: bool) -> None:
    if created:
        shutil.rmtree(path, ignore_errors=True)


def _release(path: Path, failed: bool) -> None:
    lock, created = _HELD.pop(path.resolve(), (None, False))
    if lock is not None:
        (path / PID_FILE).unlink(missing_ok=True)
        lock.release()
    if failed and created:
        # only what a failed run wrote before any output: our marker and bookkeeping files
        leftovers = [p for p in path.iterdir() if p.name not in (*_BOOKKEEPING, MARKER)] if path.is_dir() else []
        if not leftovers:
            shutil.rmtree(path, ignore_errors=True)


def release_output_dirs(failed: bool = False) -> None:
    """Release every output directory this process prepared; with ``failed``, remove the ones it created
    that hold nothing but bookkeeping (so a run that fails before writing output leaves no directory)."""
    for key in list(_HELD):
        _release(key, failed)


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode open() would
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def follow_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()``/``mkdir()`` would have given it under the user's umask (0666 or
    0777 less the umask): for what ``tempfile`` made (0600 files, 0700 directories) and then renamed into place."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@contextmanager
def new_files_follow_umask(directory: str | Path):
    """Files that the block writes or replaces under ``directory`` get :func:`follow_umask`'s mode afterwards.

    For writers that do not honour the umask: safetensors (0.8) writes every file 0600, so ``save_pretrained``
    and ``safetensors.torch.save_*`` run inside this. Files the block does not touch keep their mode."""
    directory = Path(directory)

    def inodes() -> dict[Path, int]:
        return {p: p.stat().st_ino for p in directory.rglob("*") if p.is_file()} if directory.is_dir() else {}

    before = inodes()
    yield
    for path, inode in inodes().items():
        if before.get(path) != inode:
            follow_umask(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
