"""Where a decoding step's time goes: torch.profiler over a few greedy decoding steps of a converted causal LM
(SmolLM2-135M by default, spikify's default recipe, signed) and of its real-valued source, the same prompt and cache
length.

Each model first runs the prompt (``--prompt-length`` random tokens, batch ``--batch-size``) through ``generate`` with
``--warmup`` new tokens, then the profiler records ``--steps`` more single-token forward passes on the returned cache.
Prints the operator tables (self CPU time, top ``--rows``) and writes them to ``--output`` (text):

    python -m benchmarks.profile_decode --threads 2 --output benchmarks/results/profile_decode_smollm2_t4.txt
"""

from __future__ import annotations

import argparse
import time

import torch


def decode_steps(model, prompt, warmup: int, steps: int, profile: bool, before_timing=None):
    """Seconds per decoding step of ``steps`` single-token passes after ``generate`` of ``warmup`` tokens and one
    untimed step (``before_timing()``, if given, is called just before the timed ones), and the profile or None."""
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=warmup,
            min_new_tokens=warmup,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
        cache, ids = out.past_key_values, out.sequences
        mask = torch.ones_like(ids)

        def step():
            nonlocal cache, ids, mask
            logits = model(ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = logits.past_key_values
            ids = torch.cat([ids, logits.logits[:, -1:].argmax(-1)], 1)
            mask = torch.ones_like(ids)

        step()
        if before_timing is not None:
            before_timing()
        if not profile:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            return (time.perf_counter() - start) / steps, None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds = (time.perf_counter() - start) / steps
        return seconds, prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default=None, help="conversion recipe (default: spikify's default, signed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--output", help="text file for the tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from spikelm.conversion.recipes import DEFAULT_RECIPE, recipe
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.experiments.generation_benchmark import load_pair
    from spikelm.nn import kernels

    args.recipe = args.recipe or DEFAULT_RECIPE

    source = resolve_model_source(args.model)
    vocab_calibration = torch.randint(100, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    real, spiking = load_pair(source, recipe(args.recipe), [vocab_calibration])
    prompt = torch.randint(100, real.config.vocab_size, (args.batch_size, args.prompt_length))
    lines = [
        f"{args.model} ({args.recipe}), batch {args.batch_size}, prompt {args.prompt_length} + {args.warmup} tokens, "
        f"{args.steps} profiled decoding steps, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"C++ decoding kernels {'on' if kernels.enabled() and kernels.cpp_built() else 'off'}"
    ]
    for name, model in (("real", real), ("spiking", spiking)):
        unprofiled, _ = decode_steps(model, prompt, args.warmup, args.steps, profile=False)
        seconds, prof = decode_steps(model, prompt, args.warmup, args.steps, profile=True)
        lines.append(
            f"\n== {name}: {1e3 * unprofiled:.1f} ms per decoding step unprofiled, {1e3 * seconds:.1f} ms profiled =="
        )
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
