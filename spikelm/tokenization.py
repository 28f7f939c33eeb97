"""Tokenizers that need no model hub: the bert-base-uncased WordPiece vocabulary ships with the package."""

from __future__ import annotations

import hashlib
from pathlib import Path

RESOURCES = Path(__file__).parent / "resources"
BERT_UNCASED_DIR = RESOURCES / "bert-base-uncased"
BERT_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"  # Google's bert-base-uncased vocab.txt


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def load_bert_tokenizer():
    """The exact bert-base-uncased WordPiece tokenizer (30,522 entries), from the packaged vocabulary.

    Loaded with ``from_pretrained(dir)``: in transformers 5.x ``BertTokenizerFast(vocab_file=...)``
    silently ignores the file.
    """
    from transformers import BertTokenizerFast

    vocab = BERT_UNCASED_DIR / "vocab.txt"
    if _md5(vocab) != BERT_VOCAB_MD5:
        raise RuntimeError(f"{vocab} is corrupted (md5 {_md5(vocab)}, expected {BERT_VOCAB_MD5}); reinstall spikelm")
    return BertTokenizerFast.from_pretrained(str(BERT_UNCASED_DIR))


def sample_text_path() -> Path:
    """A small public-domain text shipped with the package (Shakespeare's Sonnets)."""
    return RESOURCES / "text" / "sonnets.txt"
