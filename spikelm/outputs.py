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
    """spikelm's cache: ``$SPIKELM_CACHE``, else ``$XDG_CACHE_HOME/spikelm``, else ``~/.cache/spikelm``; created
    if missing. A location that cannot hold it is one line naming the variable."""
    if os.environ.get("SPIKELM_CACHE"):
        path, name = Path(os.environ["SPIKELM_CACHE"]).expanduser(), "SPIKELM_CACHE"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path, name = Path(base).expanduser() / "spikelm", "the default cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
        usable = path.is_dir() and os.access(path, os.R_OK | os.W_OK | os.X_OK)
        reason = "is not a writable directory"
    except OSError as err:
        usable, reason = False, f"cannot be created ({err.strerror or err})"
    if not usable:
        raise UserError(f"the spikelm cache {path} ({name}) {reason}; set SPIKELM_CACHE to a writable directory")
    return path


MARKER = "spikelm_run.json"
LOCK_FILE = ".spikelm.lock"
PID_FILE = ".spikelm.lock.pid"
_BOOKKEEPING = (LOCK_FILE, PID_FILE)

# directories prepared by this process: path -> (lock or None, created by us)
_HELD: dict[Path, tuple[object, bool]] = {}


class OutputDirError(UserError):
    """An output directory that cannot be used as asked (the message says why and what to do)."""


def prepare_output_dir(
    path: str | Path,
    command: str,
    overwrite: bool = False,
    identity: dict | None = None,
    inputs: dict | None = None,
    replaces: tuple[str, ...] = (),
) -> Path:
    """Create ``path`` for the output of ``command``, refusing a directory that holds something else.

    A non-empty directory is accepted only if it was written by the same command (and, when
    ``identity`` is given, the same run: e.g. the same model shape), or with ``overwrite=True``.
    Files already there are not deleted; the caller's writes replace its own files. The rules every writer
    shares: a directory holding a symbolic link is refused (a write would go through it, outside the directory);
    ``inputs`` (flag -> path the command reads) may not overlap it (equal, inside or containing it: an
    ``--overwrite`` would replace the input); ``replaces``: entries of a previous run of the same command that
    are removed first, refused (never deleted) when the directory was not written by ``command``.
    """
    path = _output_path(path)
    check_no_overlap(path, inputs)
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
            _check_contents(path, command, overwrite, identity, replaces)
        _lock(path, command, created)
        _check_contents(path, command, overwrite, identity, replaces)  # again, under the lock
        for entry in _present(path, replaces):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except BaseException:
        _release(path, failed=True)
        raise
    write_json_atomic(path / MARKER, {"command": command, "identity": identity})
    return path


def check_output_dir(
    path: str | Path,
    command: str,
    overwrite: bool = False,
    identity: dict | None = None,
    inputs: dict | None = None,
    replaces: tuple[str, ...] = (),
) -> None:
    """:func:`prepare_output_dir`'s refusals, read-only (nothing created or locked): a command calls it before a
    long step so that a directory it will refuse is refused first."""
    path = _output_path(path)
    check_no_overlap(path, inputs)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {path} exists and is not a directory")
    if path.is_dir():
        _check_contents(path, command, overwrite, identity, replaces)


def _output_path(path: str | Path) -> Path:
    if not str(path).strip():
        raise OutputDirError("--output-dir is empty; give a directory")
    if "\x00" in str(path):
        raise OutputDirError(f"--output-dir {str(path)!r} is not a path")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {path} exists and is not a directory")
    return path


def check_no_overlap(path: str | Path, inputs: dict | None) -> None:
    """Refuse an output directory equal to, inside, or containing an input (``inputs``: flag -> path): written
    into, or replaced with ``--overwrite``, it would destroy what the command reads."""
    out = Path(path).expanduser().resolve()
    for flag, source in (inputs or {}).items():
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            how = "is" if out == src else "is inside" if src in out.parents else "contains"
            raise OutputDirError(
                f"--output-dir {path} {how} the input {flag} {source}; choose an output directory outside the "
                "inputs (spikelm never writes over what it reads)"
            )


def _links(path: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(path):  # does not descend into linked directories
        found += [Path(root) / name for name in (*dirs, *files) if os.path.islink(os.path.join(root, name))]
    return found


def _previous_run(path: Path) -> dict | None:
    """The marker a previous spikelm run left in ``path`` (None if none, or not a JSON object)."""
    try:
        previous = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) else None


def _present(path: Path, names: tuple[str, ...]) -> list[Path]:
    return [path / n for n in names if (path / n).exists() or (path / n).is_symlink()]


def _check_contents(
    path: Path, command: str, overwrite: bool, identity: dict | None, replaces: tuple[str, ...] = ()
) -> None:
    links = _links(path)
    if links:
        raise OutputDirError(
            f"--output-dir {path} holds a symbolic link ({links[0]} -> {os.readlink(links[0])}); spikelm never "
            "writes through links: remove it or choose another directory"
        )
    if any(p.name not in _BOOKKEEPING for p in path.iterdir()) and not overwrite:
        previous = _previous_run(path)
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
    present = _present(path, replaces)  # removed by the caller: only a previous run's own, never someone else's
    previous = _previous_run(path)
    if present and (previous is None or previous.get("command") != command):
        raise OutputDirError(
            f"--output-dir {path} holds {', '.join(p.name for p in present)} that `spikelm {command}` did not write; "
            "--overwrite replaces only a previous run's own files: move them away or choose another directory"
        )


def is_main_process() -> bool:
    """RANK 0, or no launcher. ``RANK`` counts only with a ``WORLD_SIZE`` above it (as torchrun sets them): a
    stray or malformed value is refused rather than taken as "another process holds the lock"."""
    rank, world = os.environ.get("RANK", "").strip(), os.environ.get("WORLD_SIZE", "").strip()
    if not rank:
        return True
    if not rank.isdigit() or (world and not world.isdigit()):
        raise OutputDirError(
            f"RANK={rank!r} WORLD_SIZE={world!r}: expected non-negative integers (set by torchrun / accelerate launch)"
        )
    if (int(rank) > 0 and not world) or (world and int(rank) >= int(world)):
        raise OutputDirError(
            f"RANK={rank} without a WORLD_SIZE above it ({world or 'unset'}): only a launcher's worker processes may "
            "skip the output lock; unset RANK"
        )
    return int(rank) == 0


def _lock(path: Path, command: str, created: bool) -> None:
    key = path.resolve()
    if key in _HELD:  # prepared twice by one process (e.g. a library call inside a command): one lock
        return
    lock = None
    if is_main_process():
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


def lock_existing_output_dir(path: str | Path, command: str) -> None:
    """Take ``path``'s output lock now, before reading what is in it (``--resume`` reads checkpoints that a job still
    running there would be writing): the same lock :func:`prepare_output_dir` takes later, held once."""
    path = _output_path(path)
    if path.is_dir() and is_main_process():
        _lock(path, command, created=False)


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
