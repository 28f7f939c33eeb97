"""Using a trained causal LM: load a checkpoint with its tokenizer, read evaluation text, and compute
sliding-window perplexity (any transformers causal LM works; SpikeLMForCausalLM is checked for)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from spikelm.errors import MissingInputError, UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# written by `spikelm pretrain` beside the model: how often each token occurs in the training data
TOKEN_COUNTS_FILE = "token_counts.safetensors"


def load_causal_lm(model_dir: str | Path):
    """The causal LM saved in ``model_dir`` (eval mode): a SpikeLMForCausalLM, a converted model or a real-valued
    transformers causal LM, or a named source (:mod:`spikelm.evaluation.loading`); one clear error for anything
    else."""
    from .loading import load_any_causal_lm

    return load_any_causal_lm(model_dir)[0]


def load_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None, model_config=None):
    """The tokenizer saved beside the model, or the one at ``tokenizer`` (a directory or hub name); with
    ``model_config``, refused unless the model's vocabulary holds every one of its ids."""
    from transformers import AutoTokenizer

    from spikelm.data.tokenization import check_fits

    source = tokenizer if tokenizer is not None else model_dir
    if tokenizer is None and not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise MissingInputError(
            f"no tokenizer files ({' or '.join(TOKENIZER_FILES)}) in --model {model_dir}; pass --tokenizer DIR"
        )
    try:
        loaded = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from {source}: {err}") from err
    if model_config is not None:
        flag = f"--tokenizer {tokenizer}" if tokenizer is not None else f"the tokenizer saved in --model {model_dir}"
        check_fits(model_config, loaded, what=f"--model {model_dir}", tokenizer_flag=flag)
    return loaded


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or every regular file under a directory (sorted by path) joined by blank lines."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"--text-file {path} is a directory with no files in it")
    elif path.is_file():
        files = [path]
    else:
        raise MissingInputError(f"--text-file {path} does not exist (give a UTF-8 text file or a directory of them)")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    return "\n\n".join(texts)


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first, end)`` per window: tokens ``[begin, end)`` are fed, tokens ``[first, end)`` scored.

    The first window is full and scores tokens 1..window-1; each later one moves ``stride`` tokens on
    and scores only those, with at least ``window - stride`` tokens of context. So every token but
    the first (which has no context) is scored exactly once.

    ``stride == window`` gives disjoint windows instead (the usual LLM evaluation, e.g. GPTQ's): window k
    feeds tokens ``[k*window, (k+1)*window)`` and scores all but its first, which only conditions; a final
    partial chunk is scored in a full window ending at the last token.
    """
    if window < 2:
        raise UserError(f"the window must hold at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise UserError(f"--stride must be between 1 and the window length ({window}); got {stride}")
    if stride == window and num_tokens > window:
        full = num_tokens // window
        spans = [(k * window, k * window + 1, (k + 1) * window) for k in range(full)]
        if full * window < num_tokens:
            spans.append((num_tokens - window, full * window, num_tokens))
        return spans
    spans, first = [], 1
    while first < num_tokens:
        end = min(num_tokens, window if first == 1 else first + stride)
        spans.append((max(0, end - window), first, end))
        first = end
    return spans


@torch.no_grad()
def sliding_window_perplexity(
    model, token_ids: torch.Tensor, window: int, stride: int, batch_size: int = 8, progress: bool = False
) -> dict:
    """Perplexity of ``model`` on the 1-D ``token_ids`` with :func:`sliding_windows` (standard strided evaluation).

    Returns ``perplexity``, ``nll_per_token`` (nats), ``nll_sum``, ``tokens_scored`` (len - 1, or fewer
    with disjoint windows),
    ``windows``, ``window`` and ``stride``. Windows go through the model ``batch_size`` at a time;
    every window has the same length, min(window, len).
    """
    from tqdm.auto import tqdm

    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise UserError(f"need a 1-D sequence of at least 2 tokens to score, got shape {tuple(token_ids.shape)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    spans = sliding_windows(token_ids.numel(), window, stride)
    device = next(model.parameters()).device
    nll_sum, scored = 0.0, 0
    batches = range(0, len(spans), batch_size)
    # progress only on a terminal (tqdm's disable=None)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=None if progress else True):
        batch = spans[start : start + batch_size]
        inputs = torch.stack([token_ids[begin:end] for begin, _, end in batch]).to(device)
        length = inputs.shape[1]
        # logits only for the positions that predict a scored token (the last one predicts past the window)
        keep = max(end - first for _, first, end in batch) + 1
        logits = model(input_ids=inputs, logits_to_keep=keep).logits
        for row, (begin, first, end) in enumerate(batch):
            offset = length - keep
            predicting = logits[row, first - begin - 1 - offset : end - begin - 1 - offset].float()
            nll_sum += F.cross_entropy(predicting, inputs[row, first - begin :], reduction="sum").item()
            scored += end - first
    nll = nll_sum / scored
    return {
        "perplexity": math.exp(nll),
        "nll_per_token": nll,
        "nll_sum": nll_sum,
        "tokens_scored": scored,
        "windows": len(spans),
        "window": min(window, token_ids.numel()),
        "stride": stride,
    }


def unigram_log_probs(counts: torch.Tensor) -> torch.Tensor:
    """log p(token) of the unigram model with add-one-smoothed ``counts``: the baseline a language model
    must beat (predicting every token from corpus frequencies alone, without context)."""
    counts = counts.double() + 1.0
    return (counts / counts.sum()).log()


def load_unigram_log_probs(model_dir: str | Path, vocab_size: int) -> torch.Tensor | None:
    """The unigram baseline of the training data saved beside a model by ``spikelm pretrain``, if any."""
    from safetensors.torch import load_file

    path = Path(model_dir) / TOKEN_COUNTS_FILE
    if not path.is_file():
        return None
    counts = load_file(str(path))["counts"]
    if counts.numel() != vocab_size:
        raise UserError(
            f"{path} counts {counts.numel()} tokens, but the model has {vocab_size}; it belongs to "
            "another run: delete it"
        )
    return unigram_log_probs(counts)


def unigram_perplexity(log_probs: torch.Tensor, token_ids: torch.Tensor) -> dict:
    """The unigram baseline on the tokens :func:`sliding_window_perplexity` scores (all but the first)."""
    nll = -float(log_probs[token_ids[1:]].mean())
    return {"unigram_perplexity": math.exp(nll), "unigram_nll_per_token": nll}
