"""Pretraining examples from a tokenized corpus: BERT's MLM + NSP, MLM only, and causal LM blocks.

Everything random here is a pure function of ``(seed, epoch)`` (and of the example's index for
masking), never of a global RNG: the same run always sees the same batches, a resumed run picks up
at the exact batch, and under data parallelism every process agrees on the epoch's order.

* ``mlm-nsp`` (BERT, SPEC section 4): for each document, segments (sentences or lines) are gathered
  up to the target length (128 - 3, or a random shorter one with probability ``short_seq_prob``),
  split at a random segment boundary into A and B; with probability 1/2 B is replaced by segments
  of another random document (``next_sentence_label`` 1, else 0). Rebuilt every epoch.
* ``mlm``: the documents (in an epoch-dependent order, ``[SEP]`` between them) packed into full
  ``[CLS] ... [SEP]`` blocks of ``max_length``.
* ``clm``: the documents (whole text, end-of-text token between them) packed into blocks of
  ``max_length`` tokens; labels are the inputs (the model shifts them).

Masking (both MLM objectives): 15 % of the non-special tokens of each sequence (BERT's count,
``max(1, round(0.15 n))``), of which 80 % become ``[MASK]``, 10 % a random token, 10 % stay;
drawn anew every epoch (dynamic masking). Labels are -100 except at the chosen positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

OBJECTIVES = ("mlm-nsp", "mlm", "clm")
IGNORE_INDEX = -100

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]*[A-Z0-9])")


def split_sentences(line: str) -> list[str]:
    """A line of text -> sentences (a simple punctuation rule; segments for NSP need not be exact)."""
    return [s for s in _SENTENCE_END.split(line) if s.strip()]


@dataclass
class TokenizedCorpus:
    """Token ids of a corpus split, flat: document d holds segments ``doc_bounds[d]:doc_bounds[d+1]``,
    segment s holds tokens ``seg_bounds[s]:seg_bounds[s+1]``."""

    tokens: np.ndarray
    seg_bounds: np.ndarray
    doc_bounds: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.doc_bounds) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def segments(self, doc: int) -> list[np.ndarray]:
        s0, s1 = self.doc_bounds[doc], self.doc_bounds[doc + 1]
        return [self.tokens[self.seg_bounds[s] : self.seg_bounds[s + 1]] for s in range(s0, s1)]

    def document(self, doc: int) -> np.ndarray:
        s0, s1 = self.doc_bounds[doc], self.doc_bounds[doc + 1]
        return self.tokens[self.seg_bounds[s0] : self.seg_bounds[s1]]


def tokenize_corpus(texts: list[str], tokenizer, by_sentence: bool) -> TokenizedCorpus:
    """Tokenize documents: each line split into sentences (``by_sentence``, for MLM/NSP) or the whole text
    as one segment (causal LM, where the line breaks are part of the text)."""
    seg_texts, doc_sizes = [], []
    for text in texts:
        segs = [s for line in text.split("\n") for s in split_sentences(line)] if by_sentence else [text]
        seg_texts.extend(segs)
        doc_sizes.append(len(segs))
    ids = []
    for start in range(0, len(seg_texts), 2048):
        ids.extend(tokenizer(seg_texts[start : start + 2048], add_special_tokens=False, verbose=False)["input_ids"])
    keep = [i for i, seg in enumerate(ids) if seg]  # a segment of only unknown whitespace tokenizes to nothing
    seg_lengths = np.zeros(len(ids), dtype=np.int64)
    seg_lengths[keep] = [len(ids[i]) for i in keep]
    tokens = np.fromiter((t for i in keep for t in ids[i]), dtype=np.int32, count=int(seg_lengths.sum()))
    # drop empty segments, then documents left without segments
    seg_doc = np.repeat(np.arange(len(doc_sizes)), doc_sizes)[keep]
    seg_bounds = np.concatenate([[0], np.cumsum(seg_lengths[keep])])
    docs, counts = np.unique(seg_doc, return_counts=True)
    doc_bounds = np.concatenate([[0], np.cumsum(counts)])
    return TokenizedCorpus(tokens, seg_bounds, doc_bounds)


# ----------------------------------------------------------------------------------------------
# Examples for one epoch: arrays of fixed-length sequences
# ----------------------------------------------------------------------------------------------


@dataclass
class Examples:
    input_ids: np.ndarray  # (N, L) int64
    token_type_ids: np.ndarray  # (N, L)
    attention_mask: np.ndarray  # (N, L)
    next_sentence_label: np.ndarray | None  # (N,) for mlm-nsp

    def __len__(self) -> int:
        return len(self.input_ids)


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator) -> None:
    """BERT's truncation: drop tokens from the front or back (at random) of the longer segment."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def nsp_examples(
    corpus: TokenizedCorpus, tokenizer, max_length: int, rng: np.random.Generator, short_seq_prob: float = 0.1
) -> Examples:
    """BERT's sentence-pair instances (see the module docstring); shuffled."""
    max_tokens = max_length - 3
    pairs = []
    num_docs = corpus.num_documents
    for doc in range(num_docs):
        segments = corpus.segments(doc)
        target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
        chunk, length, i = [], 0, 0
        while i < len(segments):
            chunk.append(segments[i])
            length += len(segments[i])
            if i == len(segments) - 1 or length >= target:
                a_end = 1 if len(chunk) == 1 else int(rng.integers(1, len(chunk)))
                a = [t for seg in chunk[:a_end] for t in seg.tolist()]
                if num_docs > 1 and (len(chunk) == 1 or rng.random() < 0.5):
                    is_random = 1
                    other = int(rng.integers(0, num_docs - 1))
                    other += other >= doc  # any document but this one
                    other_segs = corpus.segments(other)
                    b = []
                    for seg in other_segs[int(rng.integers(0, len(other_segs))) :]:
                        b.extend(seg.tolist())
                        if len(b) >= target - len(a):
                            break
                    i -= len(chunk) - a_end  # the unused segments start the next chunk
                else:
                    is_random = 0
                    b = [t for seg in chunk[a_end:] for t in seg.tolist()]
                _truncate_pair(a, b, max_tokens, rng)
                if a and b:
                    pairs.append((a, b, is_random))
                chunk, length = [], 0
            i += 1
    order = rng.permutation(len(pairs))
    ids = np.full((len(pairs), max_length), tokenizer.pad_token_id, dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    labels = np.zeros(len(pairs), dtype=np.int64)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for row, k in enumerate(order):
        a, b, is_random = pairs[k]
        seq = [cls, *a, sep, *b, sep]
        ids[row, : len(seq)] = seq
        types[row, len(a) + 2 : len(seq)] = 1
        mask[row, : len(seq)] = 1
        labels[row] = is_random
    return Examples(ids, types, mask, labels)


def _document_stream(corpus: TokenizedCorpus, separator: int, rng: np.random.Generator) -> np.ndarray:
    parts = []
    for doc in rng.permutation(corpus.num_documents):
        parts.append(corpus.document(doc))
        parts.append(np.array([separator], dtype=corpus.tokens.dtype))
    return np.concatenate(parts).astype(np.int64)


def mlm_examples(corpus: TokenizedCorpus, tokenizer, max_length: int, rng: np.random.Generator) -> Examples:
    """Full ``[CLS] ... [SEP]`` blocks from the documents (shuffled order, ``[SEP]`` between documents)."""
    stream = _document_stream(corpus, tokenizer.sep_token_id, rng)
    width = max_length - 2
    blocks = stream[: len(stream) // width * width].reshape(-1, width)
    n = len(blocks)
    ids = np.concatenate(
        [np.full((n, 1), tokenizer.cls_token_id), blocks, np.full((n, 1), tokenizer.sep_token_id)], axis=1
    )
    return Examples(ids, np.zeros_like(ids), np.ones_like(ids), None)


def document_separator(tokenizer) -> int:
    """The token between documents in causal-LM blocks: end-of-text, else (a BERT vocabulary) ``[SEP]``."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def clm_examples(corpus: TokenizedCorpus, tokenizer, max_length: int, rng: np.random.Generator) -> Examples:
    """Blocks of ``max_length`` tokens from the documents (shuffled order, end-of-text between them)."""
    stream = _document_stream(corpus, document_separator(tokenizer), rng)
    ids = stream[: len(stream) // max_length * max_length].reshape(-1, max_length)
    return Examples(ids, np.zeros_like(ids), np.ones_like(ids), None)


def build_examples(
    objective: str,
    corpus: TokenizedCorpus,
    tokenizer,
    max_length: int,
    seed: int,
    epoch: int,
    short_seq_prob: float = 0.1,
) -> Examples:
    """The examples of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
    rng = np.random.default_rng([seed, epoch, 0])
    if objective == "mlm-nsp":
        return nsp_examples(corpus, tokenizer, max_length, rng, short_seq_prob)
    if objective == "mlm":
        return mlm_examples(corpus, tokenizer, max_length, rng)
    if objective == "clm":
        return clm_examples(corpus, tokenizer, max_length, rng)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


# ----------------------------------------------------------------------------------------------
# Masking and batches
# ----------------------------------------------------------------------------------------------


def mask_tokens(
    input_ids: np.ndarray,
    candidates: np.ndarray,
    rng: np.random.Generator,
    vocab_size: int,
    mask_token_id: int,
    probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one sequence: returns ``(masked input ids, labels)`` (labels -100 where not chosen)."""
    positions = np.flatnonzero(candidates)
    labels = np.full_like(input_ids, IGNORE_INDEX)
    if len(positions) == 0:
        return input_ids.copy(), labels
    count = max(1, int(round(len(positions) * probability)))
    chosen = rng.choice(positions, size=count, replace=False)
    labels[chosen] = input_ids[chosen]
    masked = input_ids.copy()
    action = rng.random(count)
    masked[chosen[action < 0.8]] = mask_token_id
    random_slots = chosen[(action >= 0.8) & (action < 0.9)]
    masked[random_slots] = rng.integers(0, vocab_size, size=len(random_slots))
    return masked, labels


class Batcher:
    """Turns example indices into model inputs; MLM masking depends on ``(seed, epoch, index)`` only."""

    def __init__(self, objective: str, tokenizer, seed: int, mlm_probability: float = 0.15):
        self.objective = objective
        self.seed = seed
        self.mlm_probability = mlm_probability
        self.vocab_size = len(tokenizer)
        self.mask_token_id = tokenizer.mask_token_id
        self.special_ids = np.array(sorted(tokenizer.all_special_ids), dtype=np.int64)

    def __call__(self, examples: Examples, indices: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        import torch

        ids = examples.input_ids[indices]
        batch = {"input_ids": ids, "attention_mask": examples.attention_mask[indices]}
        if self.objective == "clm":
            batch["labels"] = ids
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        batch["token_type_ids"] = examples.token_type_ids[indices]
        candidates = (batch["attention_mask"] == 1) & ~np.isin(ids, self.special_ids)
        masked, labels = np.empty_like(ids), np.empty_like(ids)
        for row, index in enumerate(indices):
            rng = np.random.default_rng([self.seed, epoch, int(index), 1])
            masked[row], labels[row] = mask_tokens(
                ids[row], candidates[row], rng, self.vocab_size, self.mask_token_id, self.mlm_probability
            )
        batch["input_ids"], batch["labels"] = masked, labels
        if examples.next_sentence_label is not None:
            batch["next_sentence_label"] = examples.next_sentence_label[indices]
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
