"""Where a decoding step's time goes, by module: wall time of the calls of each part of a converted causal LM's step
(spiking linears, neurons, the K/V cache, RMSNorm, sdpa, rotary, attention and MLP totals) and of the real-valued
source's, over ``--steps`` single-token forward passes after a ``--prompt-length`` prompt and 8 greedy tokens.

The parts are timed by wrapping their functions with ``time.perf_counter`` (nested parts overlap: the attention
total holds the cache, which holds the K/V neurons); cheaper than torch.profiler and without its per-operator cost:

    python -m benchmarks.decode_attribution --threads 2 --steps 10
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="elastic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers.models.llama.modeling_llama as llama

    import spikelm.conversion.cache as cache_module
    from benchmarks.profile_decode import decode_steps
    from spikelm.conversion.recipes import recipe
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.experiments.generation_benchmark import load_pair
    from spikelm.nn.neuron import ElasticBiSpikingNeuron

    placement = importlib.import_module("spikelm.conversion.placement")
    seconds, calls = collections.defaultdict(float), collections.Counter()

    def wrap(owner, name, label):
        function = getattr(owner, name)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                seconds[label] += time.perf_counter() - start
                calls[label] += 1

        setattr(owner, name, timed)

    calibration = torch.randint(100, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    real, spiking = load_pair(resolve_model_source(args.model), recipe(args.recipe), [calibration])
    wrap(cache_module.SpikeCodeLayer, "update", "K/V cache update (with its neurons)")
    wrap(ElasticBiSpikingNeuron, "forward", "elastic neurons")
    wrap(placement, "spike_linear", "spiking linears")
    wrap(torch.nn.functional, "scaled_dot_product_attention", "sdpa")
    wrap(llama.LlamaRMSNorm, "forward", "RMSNorm")
    wrap(llama, "apply_rotary_pos_emb", "rotary")
    wrap(llama.LlamaAttention, "forward", "attention total")
    wrap(llama.LlamaMLP, "forward", "MLP total")
    prompt = torch.randint(
        100, real.config.vocab_size, (1, args.prompt_length), generator=torch.Generator().manual_seed(1)
    )
    print(
        f"{args.model} ({args.recipe}), prompt {args.prompt_length} + 8 tokens, {args.steps} steps, "
        f"{args.threads} threads"
    )

    def reset():
        seconds.clear()
        calls.clear()

    for name, model in (("real", real), ("spiking", spiking)):
        total, _ = decode_steps(model, prompt, 8, args.steps, profile=False, before_timing=reset)
        print(f"== {name}: {1e3 * total:.1f} ms per step")
        for label, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {label:<38} {1e3 * value / args.steps:8.2f} ms  {calls[label] // args.steps:4d} calls per step")


if __name__ == "__main__":
    main()
