"""``spikelm generate``: continue prompts with a causal LM (a native SpikeLM, a converted model, its real-valued
source or a named source): greedy, sampling or beam search."""

from __future__ import annotations

from spikelm.errors import UserError

from .argtypes import add_output_dir, model_source, nonnegative_int, number, positive_int, positive_number, utf8_text


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue text prompts with a causal LM (SpikeLM, converted, real-valued source)",
        description=(
            "Load a causal LM and its tokenizer and continue each --prompt with transformers' generate(): greedy "
            "by default, sampling with --do-sample, beam search with --num-beams. Several prompts run as one "
            "left-padded batch. --model: a SpikeLMForCausalLM directory, a converted model (spikelm spikify; its "
            "KV cache holds spike codes), a real-valued transformers causal LM of a family spikify converts, or "
            "smollm2-135m or gemma3-270m."
        ),
    )
    p.add_argument(
        "--model",
        type=model_source,
        required=True,
        help="a causal LM directory (SpikeLMForCausalLM, converted, or real-valued), smollm2-135m or gemma3-270m",
    )
    p.add_argument(
        "--prompt", type=utf8_text, required=True, action="append", help="text to continue (repeat for a batch)"
    )
    p.add_argument("--tokenizer", help="tokenizer directory or hub name (default: the one saved in --model)")
    p.add_argument("--max-new-tokens", type=positive_int, default=50, help="tokens to generate per prompt (default 50)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_number, help="sampling temperature (needs --do-sample)")
    p.add_argument("--top-k", type=positive_int, help="sample from the k most likely tokens (needs --do-sample)")
    p.add_argument(
        "--top-p", type=number(0.0, 1.0, exclusive_minimum=True), help="nucleus sampling mass (needs --do-sample)"
    )
    p.add_argument(
        "--num-beams", type=positive_int, default=1, help="beam search with this many beams (default 1: none)"
    )
    p.add_argument("--no-cache", action="store_true", help="recompute every token instead of using the KV cache")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed for sampling (default 0)")
    add_output_dir(p, required=False)
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise UserError(f"--num-beams must be at least 1, got {args.num_beams}")
    for name in ("temperature", "top_k", "top_p"):
        if getattr(args, name) is not None and not args.do_sample:
            raise UserError(f"--{name.replace('_', '-')} only applies to sampling: add --do-sample")
    if args.temperature is not None and not args.temperature > 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt.strip():
            raise UserError(f"--prompt number {i} is empty; give the text to continue")


def run(args) -> int:
    import time

    import torch

    from spikelm.evaluation.loading import inspect_model, load_model
    from spikelm.evaluation.perplexity import load_tokenizer
    from spikelm.outputs import prepare_output_dir, write_json_atomic

    _check_args(args)
    spec = inspect_model(args.model, need_causal=True)
    tokenizer = load_tokenizer(spec.path, args.tokenizer, spec.config)
    max_length = spec.config.max_position_embeddings
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in args.prompt]
    for i, ids in enumerate(prompts, 1):
        if not ids:
            raise UserError(f"--prompt number {i} gives no tokens with this tokenizer")
        if len(ids) > max_length:
            raise UserError(
                f"--prompt number {i} is {len(ids)} tokens, longer than the model's maximum length {max_length} "
                "(max_position_embeddings); shorten it"
            )
        if len(ids) + args.max_new_tokens > max_length:
            raise UserError(
                f"--prompt number {i} ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                f"maximum length {max_length}; lower --max-new-tokens to at most {max_length - len(ids)}"
            )
    out_dir = (
        prepare_output_dir(args.output_dir, "generate", args.overwrite, inputs={"--model": spec.path})
        if args.output_dir
        else None
    )
    model = load_model(spec)

    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    options = {
        k: v
        for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p))
        if v is not None
    }
    if tokenizer.eos_token_id is not None:
        options["eos_token_id"] = tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            num_beams=args.num_beams,
            use_cache=not args.no_cache,
            pad_token_id=pad_id,
            **options,
        )
    seconds = time.perf_counter() - start

    results = []
    for prompt, row in zip(args.prompt, output[:, width:], strict=True):
        new = row.tolist()
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        results.append(
            {"prompt": prompt, "continuation": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new)}
        )
    for i, r in enumerate(results, 1):
        print(f"[{i}] {r['prompt']}")
        print(f"    -> {r['continuation']}")
    total = sum(r["new_tokens"] for r in results)
    print(
        f"generated {total} tokens in {seconds:.2f} s ({total / seconds:.1f} tokens/s, "
        f"{'no cache' if args.no_cache else 'KV cache'}; {spec.describe()}, {_steps(spec)})"
    )
    if out_dir is not None:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "output_dir", "overwrite")}
        write_json_atomic(
            out_dir / "generations.json", {"settings": settings, "seconds": seconds, "generations": results}
        )
        print(f"wrote {out_dir / 'generations.json'}")
    return 0


def _steps(spec) -> str:
    """The time steps of the model, in words."""
    config = spec.config
    if spec.kind == "native":
        return f"{config.num_steps if config.spiking else 0} time steps"
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return "real-valued"
    from spikelm.nn.neurons import neuron_class

    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return neuron_class(quant.get("neuron", "elastic")).steps_summary(quant)
