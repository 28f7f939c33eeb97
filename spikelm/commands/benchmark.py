"""``spikelm benchmark``: training/inference time and memory of SpikeLM vs its reference path and BERT."""

from __future__ import annotations

import json

from spikelm.errors import UserError

from .argtypes import device, integer, positive_int
from .main import add_output_dir


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
    add_output_dir(p, required=False)
    p.set_defaults(func=run, output_dir="runs/benchmark")


def run(args) -> int:
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
