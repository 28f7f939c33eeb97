"""``spikelm perplexity``: sliding-window perplexity of a causal LM (a native SpikeLM, a converted model, its
real-valued source or a named source) on a text file or directory."""

from __future__ import annotations

from .argtypes import add_output_dir, integer, model_source, positive_int, text_path


def register(sub) -> None:
    p = sub.add_parser(
        "perplexity",
        help="sliding-window perplexity of a causal LM (SpikeLM, converted, real-valued source) on plain text",
        description=(
            "Tokenize a UTF-8 text file (or every file of a directory, in path order, joined by blank lines) and "
            "score it with overlapping windows: the first window scores its tokens after the first; each next "
            "window moves --stride tokens on and scores only those, so every token but the first is counted once. "
            "A model trained with `spikelm pretrain` also gets the unigram baseline of its training data on the "
            "same tokens. --model: a causal SpikeLM directory, a converted model (spikelm spikify), a real-valued "
            "transformers causal LM of a family spikify converts (LLaMA, Mistral, Qwen2/3, Gemma-3, GPT-2), "
            "or smollm2-135m / gemma3-270m."
        ),
    )
    p.add_argument(
        "--model",
        type=model_source,
        required=True,
        help="a causal LM directory (SpikeLMForCausalLM, converted, or real-valued), smollm2-135m or gemma3-270m",
    )
    p.add_argument(
        "--text-file", type=text_path, required=True, help="UTF-8 text file, or a directory of plain-text files"
    )
    p.add_argument("--tokenizer", help="tokenizer directory or hub name (default: the one saved in --model)")
    p.add_argument("--max-length", type=integer(2), help="window length in tokens (default: max_position_embeddings)")
    p.add_argument(
        "--stride",
        type=positive_int,
        help="new tokens scored per window, at most the window length (equal: disjoint windows; default: half)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    add_output_dir(p, required=False)
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    import torch

    from spikelm.errors import UserError
    from spikelm.evaluation.loading import inspect_model, load_model
    from spikelm.evaluation.perplexity import (
        load_tokenizer,
        load_unigram_log_probs,
        read_text,
        sliding_window_perplexity,
        unigram_perplexity,
    )
    from spikelm.outputs import prepare_output_dir, write_json_atomic

    text = read_text(args.text_file)
    spec = inspect_model(args.model, need_causal=True)
    tokenizer = load_tokenizer(spec.path, args.tokenizer, spec.config)
    unigram = load_unigram_log_probs(spec.path, spec.config.vocab_size)
    limit = spec.config.max_position_embeddings
    window = limit if args.max_length is None else args.max_length
    if not 2 <= window <= limit:
        raise UserError(f"--max-length must be between 2 and the model's maximum length {limit}, got {window}")
    stride = window // 2 if args.stride is None else args.stride
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    if ids.numel() < 2:
        raise UserError(f"--text-file {args.text_file} holds {ids.numel()} token(s); perplexity needs at least 2")
    out_dir = (
        prepare_output_dir(args.output_dir, "perplexity", args.overwrite, inputs={"--model": spec.path})
        if args.output_dir
        else None
    )
    model = load_model(spec)

    start = time.perf_counter()
    result = sliding_window_perplexity(model, ids, window, stride, args.batch_size, progress=True)
    result["seconds"] = time.perf_counter() - start
    result.update(
        model=str(args.model),
        model_kind=spec.kind,
        architecture=spec.architecture,
        text=str(args.text_file),
        text_tokens=int(ids.numel()),
    )
    print(
        f"{spec.describe()}: perplexity {result['perplexity']:.3f} ({result['nll_per_token']:.4f} nats/token) over "
        f"{result['tokens_scored']} tokens of {args.text_file}; window {result['window']}, stride "
        f"{result['stride']}, {result['windows']} windows, {result['seconds']:.1f} s"
    )
    if unigram is not None:
        result.update(unigram_perplexity(unigram, ids))
        print(
            f"unigram baseline (training-data token frequencies) on the same tokens: perplexity "
            f"{result['unigram_perplexity']:.3f} ({result['unigram_nll_per_token']:.4f} nats/token)"
        )
    if out_dir is not None:
        write_json_atomic(out_dir / "perplexity.json", result)
        print(f"wrote {out_dir / 'perplexity.json'}")
    return 0
