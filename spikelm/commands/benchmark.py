"""``spikelm benchmark``: training/inference time and memory of SpikeLM vs its reference path and BERT."""

from __future__ import annotations

import json

from spikelm.errors import UserError

from .argtypes import add_output_dir, device, integer, model_ref, positive_int, text_file


def register(sub) -> None:
    p = sub.add_parser(
        "benchmark",
        help="time and memory of the fused model vs its per-step reference path and the real-valued BERT",
        description=(
            "Time training steps and inference of a SpikeLM encoder on its fused path and on its readable "
            "per-step reference path, side by side with transformers' BertModel of the same shape (x T), "
            "and count the bytes autograd saves. Prints a table, writes benchmark.json into --output-dir and "
            "prints the headline figures as one JSON object on the last line."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="only the headline case (hidden 256, 4 layers, batch 8x128, T=4; on CUDA also BERT-base)",
    )
    p.add_argument(
        "--device", type=device, choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="timed repetitions per path (default 7 quick, 5 full)"
    )
    p.add_argument(
        "--generation-lengths",
        type=integer(2),
        nargs="*",
        default=None,
        metavar="L",
        help="total lengths for the generation benchmark, with and without the KV cache "
        "(default 64 256 1024; none with --quick; give no value to skip it)",
    )
    p.add_argument("--skip-training", action="store_true", help="only the generation benchmark")
    g = p.add_argument_group(
        "generation of a converted model (--generation --model SRC)",
        "Convert SRC with a recipe and time greedy generate() of the spiking model and of SRC side by side, "
        "interleaved, in one process: prefill and decode tokens/s, peak memory, cache bytes per token (CPU, float32).",
    )
    g.add_argument(
        "--generation",
        action="store_true",
        help="only generation: of the converted --model and its source if given, else of the native causal SpikeLM",
    )
    g.add_argument("--model", type=model_ref, default=None, help="source model: a directory or a named source")
    g.add_argument(
        "--recipe",
        default=None,
        help="conversion recipe: a registered neuron's (spikelm.nn.neurons: gif, elastic, signed; default: spikify's "
        "default recipe, signed)",
    )
    g.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16], help="default: 1 16")
    g.add_argument("--prompt-lengths", type=positive_int, nargs="+", default=[128, 1024], help="default: 128 1024")
    g.add_argument("--new-tokens", type=integer(2), default=128, help="greedy tokens generated (default 128)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch threads for both (default: torch's)")
    g.add_argument(
        "--calibration-sequences", type=positive_int, default=4, help="calibration sequences (default 4; speed only)"
    )
    g.add_argument("--calibration-length", type=integer(2), default=128, help="tokens per sequence (default 128)")
    g.add_argument("--calibration-text", type=text_file, default=None, help="UTF-8 text (default: the pypi corpus)")
    g.add_argument(
        "--compare-unpacked",
        action="store_true",
        help="also time the spiking model with an unpacked (one code per byte) cache, interleaved",
    )
    g.add_argument(
        "--compare-pytorch",
        action="store_true",
        help="also time the spiking model with the C++ decoding kernels off (PyTorch and MKL only), interleaved",
    )
    add_output_dir(p, required=False)
    p.set_defaults(func=run, output_dir="runs/benchmark")


def run(args) -> int:
    if args.model is not None:
        return run_converted(args)
    if args.generation:
        args.skip_training = True
        if args.generation_lengths is None:
            args.generation_lengths = [64, 256, 1024]
    import torch

    from spikelm.experiments.benchmark import HEADLINE, cases_for, format_table, machine_info, measure_case
    from spikelm.outputs import prepare_output_dir, write_json_atomic

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    repeats = args.repeats if args.repeats is not None else (7 if args.quick else 5)
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    lengths = (
        args.generation_lengths if args.generation_lengths is not None else ([] if args.quick else [64, 256, 1024])
    )
    if any(length <= 16 for length in lengths):
        raise UserError(f"--generation-lengths must all exceed the 16 generated tokens, got {lengths}")
    if args.skip_training and not lengths:
        raise UserError("--skip-training leaves nothing to measure: give --generation-lengths")
    out = prepare_output_dir(args.output_dir, "benchmark", args.overwrite)
    results = []
    report = {
        "machine": machine_info(device),
        "device": device,
        "dtype": dtype_name,
        "quick": args.quick,
        "cases": results,
    }
    if lengths:
        from spikelm.experiments.benchmark import format_generation_table, measure_generation

        print(f"measuring generation at lengths {lengths} ({device}, float32)...", flush=True)
        report["generation"] = measure_generation(lengths, device, repeats=min(repeats, 3))
        write_json_atomic(out / "benchmark.json", report)
        print(format_generation_table(report["generation"]))
    if args.skip_training:
        print(f"wrote {out / 'benchmark.json'}")
        return 0
    for case in cases_for(device, args.quick):
        print(f"measuring {case.name} ({device}, {dtype_name}, {repeats} repetitions)...", flush=True)
        results.append(measure_case(case, device, getattr(torch, dtype_name), repeats))
        write_json_atomic(out / "benchmark.json", report)  # after every case: a long run keeps what it measured
    print(format_table(results))
    print(f"wrote {out / 'benchmark.json'}")
    headline = next(r for r in results if r["case"] == HEADLINE.name)
    summary = {
        key: headline[key]
        for key in (
            "case",
            "train_ratio_vs_ann",
            "infer_ratio_vs_ann",
            "mem_ratio_vs_reference",
            "train_s",
            "infer_s",
            "saved_bytes",
        )
    }
    summary.update(
        device=device,
        dtype=dtype_name,
        repeats=repeats,
        others={
            r["case"]: {k: r[k] for k in ("train_ratio_vs_ann", "infer_ratio_vs_ann", "mem_ratio_vs_reference")}
            for r in results
            if r is not headline
        },
    )
    print(json.dumps(summary))
    return 0


def run_converted(args) -> int:
    """``--generation --model SRC``: the converted model against its source (see generation_benchmark). ``--threads``
    holds for this run only: the thread count is restored after it (a caller that runs the command in its own process,
    e.g. a test, keeps its own; float sums depend on it)."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run_converted(args)
    finally:
        torch.set_num_threads(threads)


def _run_converted(args) -> int:
    if not args.generation:
        raise UserError("--model is for the generation benchmark of a converted model: add --generation")
    if args.device == "cuda":
        raise UserError("--device cuda: the converted-model generation benchmark runs on CPU only; use --device cpu")
    max_length = max(args.prompt_lengths) + args.new_tokens
    import torch

    from spikelm.conversion import decode_step
    from spikelm.nn import kernels

    kernel_on = kernels.enabled()  # a bad $SPIKELM_(CPU_)KERNELS(_MAX_ROWS): one line, before any work
    kernel_rows = kernels.max_rows()
    step_on = decode_step.enabled()  # a bad $SPIKELM_DECODE_STEP too
    from transformers import AutoConfig, AutoTokenizer

    from spikelm.conversion.recipes import calibration_batches, recipe, recipe_names
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.experiments.benchmark import machine_info
    from spikelm.experiments.generation_benchmark import format_pair_table, load_pair, measure_pair
    from spikelm.outputs import prepare_output_dir, write_json_atomic

    if args.recipe is None:
        args.recipe = recipe_names()[0]  # spikify's default recipe (the default neuron's)
    if args.recipe not in recipe_names():
        raise UserError(f"--recipe must be one of {', '.join(recipe_names())}, got {args.recipe!r}")
    source = resolve_model_source(args.model)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--model {args.model}: cannot read its config.json ({err})") from None
    if "CausalLM" not in str(getattr(config, "architectures", None) or []):
        raise UserError(f"--model {args.model}: expected a causal LM (architectures {config.architectures})")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise UserError(
            f"--prompt-lengths/--new-tokens: {max(args.prompt_lengths)} + {args.new_tokens} tokens exceed the model's "
            f"max_position_embeddings {limit}"
        )
    fields = recipe(args.recipe)
    out = prepare_output_dir(args.output_dir, "benchmark", args.overwrite)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {args.model}: no usable tokenizer saved with the model ({err})") from None
    batches, calibration = calibration_batches(
        tokenizer, args.calibration_text, args.calibration_sequences, args.calibration_length
    )
    print(f"converting {args.model} ({args.recipe}), calibrating on {calibration}...", flush=True)
    real, spiking = load_pair(source, fields, batches)
    report = {
        "machine": machine_info("cpu"),
        "model": str(args.model),
        "recipe": args.recipe,
        "recipe_fields": fields,
        "calibration": calibration,
        "dtype": "float32",
        "attn_implementation": real.config._attn_implementation,
        "spiking_attn_implementation": spiking.config._attn_implementation,
        "torch_compile_of_the_model": False,
        "cache_packing": _packing_name(spiking),
    }
    print(
        f"both models: float32, {torch.get_num_threads()} threads, attention {report['attn_implementation']} "
        f"(spiking: {report['spiking_attn_implementation']}, float64 accumulation), "
        f"no torch.compile of the model; spike cache: {report['cache_packing']}; C++ decoding kernels "
        f"{'on' if kernel_on else 'off'} (linears of at most {kernel_rows} rows)",
        flush=True,
    )
    report["generation"] = measure_pair(
        real,
        spiking,
        args.batch_sizes,
        args.prompt_lengths,
        args.new_tokens,
        args.repeats or 3,
        compare_unpacked=args.compare_unpacked,
        compare_pytorch=args.compare_pytorch,
    )
    report["cpu_kernels"] = {
        "enabled": kernel_on,
        "built": kernel_on and kernels.cpp_built(),
        "max_rows": kernel_rows,
    }
    report["decode_step"] = step_on  # the converted blocks' decoding step in one function (SPIKELM_DECODE_STEP)
    write_json_atomic(out / "benchmark.json", report)
    print(format_pair_table(report["generation"]))
    print(f"C++ decoding kernels: {'on' if report['cpu_kernels']['built'] else 'off'}")
    print(f"blocks' decoding step in one function: {'on' if step_on else 'off'}")
    print(f"wrote {out / 'benchmark.json'}")
    first = report["generation"]["cases"][0]
    summary = {k: first[k] for k in ("batch_size", "prompt_length", "decode_ratio", "prefill_ratio_vs_T")}
    summary["cache_ratio_vs_fp16"] = first["cache_ratio_vs_fp16"]
    print(json.dumps(summary))
    return 0


def _packing_name(model) -> str:
    from spikelm.conversion.cache import cache_layer_class
    from spikelm.models.modeling_spikelm_causal import DEFAULT_PACKING
    from spikelm.nn.neurons import neuron_class

    return cache_layer_class(neuron_class(model._spikelm.config.neuron)).describe_packing(DEFAULT_PACKING)
