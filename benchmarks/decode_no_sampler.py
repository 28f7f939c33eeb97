"""Decode ms/step of a converted model (C++ decoding kernels on and off) and its source, interleaved, without the
peak-memory sampler thread of ``spikelm benchmark --generation`` (a thread waking every 2 ms, which competes for the
2 cores with the main thread and torch's OpenMP worker): the same greedy ``generate`` timings, t(n) - t(1), medians.

``--real-kernel`` adds the real-valued model with its linear layers (not the LM head) through the same few-row C++
kernel as the spiking model's (``real_kernel``): whether the kernel itself, rather than spiking, makes the difference.

    python -m benchmarks.decode_no_sampler --threads 2 --repeats 3 --new-tokens 128 --prompt-length 128
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics

import torch


@contextlib.contextmanager
def real_linears_through_kernel(model):
    """The blocks' ``nn.Linear`` layers of ``model`` (not its LM head) run :func:`spike_linear` inside the block."""
    if model is None:
        yield
        return
    from spikelm.nn.kernels import spike_linear

    linears = [m for m in model.model.layers.modules() if type(m) is torch.nn.Linear]
    for m in linears:
        m.forward = functools.partial(lambda mod, x: spike_linear(x, mod.weight, mod.bias), m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--real-kernel", action="store_true", help="also time the real model through the kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from spikelm.conversion.recipes import recipe
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.experiments.generation_benchmark import _generate_seconds, load_pair
    from spikelm.nn import kernels

    calibration = torch.randint(100, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    real, spiking = load_pair(resolve_model_source(args.model), recipe("elastic"), [calibration])
    prompt = torch.randint(100, real.config.vocab_size, (args.batch_size, args.prompt_length))
    variants = {"real": (real, None), "spiking": (spiking, True), "spiking_pytorch": (spiking, False)}
    if args.real_kernel:
        variants["real_kernel"] = (real, True)

    def run(name, model, flag, tokens):
        with kernels.forced(flag), real_linears_through_kernel(model if name == "real_kernel" else None):
            return _generate_seconds(model, prompt, tokens)[0]

    for name, (model, flag) in variants.items():
        run(name, model, flag, 2)
    times = {name: {"first": [], "full": []} for name in variants}
    for repeat in range(args.repeats):
        for name, (model, flag) in variants.items():
            times[name]["first"].append(run(name, model, flag, 1))
            times[name]["full"].append(run(name, model, flag, args.new_tokens))
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
    if args.real_kernel:
        print(f"decode ratio real_kernel/spiking: {steps['real_kernel'] / steps['spiking']:.3f}")
    print(
        f"decode ratio real/spiking: kernel {steps['real'] / steps['spiking']:.3f}, "
        f"kernels off {steps['real'] / steps['spiking_pytorch']:.3f} "
        f"(batch {args.batch_size}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens, {args.repeats} repeats, {torch.get_num_threads()} threads, no sampler thread)"
    )


if __name__ == "__main__":
    main()
