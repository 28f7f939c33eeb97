"""Decode ms/step of a converted model (sparse-input kernel on and off) and its source, interleaved, without the
peak-memory sampler thread of ``spikelm benchmark --generation`` (a thread waking every 2 ms, which competes for the
2 cores with the main thread and torch's OpenMP worker): the same greedy ``generate`` timings, t(n) - t(1), medians.

    python -m benchmarks.decode_no_sampler --threads 2 --repeats 3 --new-tokens 128 --prompt-length 128
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from spikelm.conversion.recipes import recipe
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.experiments.generation_benchmark import _generate_seconds, load_pair
    from spikelm.nn import sparse_linear

    calibration = torch.randint(100, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    real, spiking = load_pair(resolve_model_source(args.model), recipe("elastic"), [calibration])
    prompt = torch.randint(100, real.config.vocab_size, (args.batch_size, args.prompt_length))
    variants = {"real": (real, None), "spiking": (spiking, True), "spiking_gemm": (spiking, False)}
    for model, flag in variants.values():
        with sparse_linear.forced(flag):
            _generate_seconds(model, prompt, 2)
    times = {name: {"first": [], "full": []} for name in variants}
    for repeat in range(args.repeats):
        for name, (model, flag) in variants.items():
            with sparse_linear.forced(flag):
                times[name]["first"].append(_generate_seconds(model, prompt, 1)[0])
                times[name]["full"].append(_generate_seconds(model, prompt, args.new_tokens)[0])
        print(
            f"repeat {repeat + 1}: "
            + ", ".join(f"{n} {t['first'][-1]:.2f}+{t['full'][-1]:.2f} s" for n, t in times.items()),
            flush=True,
        )
    steps = {}
    for name, t in times.items():
        first, full = statistics.median(t["first"]), statistics.median(t["full"])
        steps[name] = 1e3 * (full - first) / (args.new_tokens - 1)
        print(f"{name:<13} prefill {1e3 * first:8.1f} ms  decode {steps[name]:7.1f} ms/step")
    print(
        f"decode ratio real/spiking: kernel {steps['real'] / steps['spiking']:.3f}, "
        f"GEMM {steps['real'] / steps['spiking_gemm']:.3f} (batch {args.batch_size}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens, {args.repeats} repeats, {torch.get_num_threads()} threads, no sampler thread)"
    )


if __name__ == "__main__":
    main()
