"""Generation speed of the causal SpikeLM with and without the KV cache, at several context lengths.

For each model (spiking, and the real-valued model of the same shape) and each total length L, a
prompt of L - n random tokens is continued by n greedy tokens with ``generate()``. Decode speed is
(n - 1) / (t(n new tokens) - t(1 new token)): the prefill cancels out. Without the cache every new
token re-runs the whole sequence; with it, only the new token runs and its cost grows with L only
through attention over the cached keys and values (a linear term).

    flock /work/measure.lock python benchmarks/generation.py --output benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from spikelm import SpikeLMConfig, SpikeLMForCausalLM


def build(args, spiking: bool) -> SpikeLMForCausalLM:
    config = SpikeLMConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size, max_position_embeddings=max(args.lengths),
        position_embedding_type="rotary", num_steps=args.num_steps, spiking=spiking, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(config).eval()
    with torch.no_grad():  # initialise the alphas, as a trained model has them
        model(torch.randint(0, args.vocab_size, (2, 64)))
    return model


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cache_bytes_per_token(model, prompt) -> float:
    """Bytes the cache holds per token (all layers), from a real prefill."""
    with torch.no_grad():
        cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
    total = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                for layer in cache.layers)
    return total / prompt.numel()


def measure(model, length: int, new_tokens: int, use_cache: bool, repeats: int) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (1, length - new_tokens))

    def generate(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      use_cache=use_cache, pad_token_id=0)

    with torch.no_grad():
        full = best_time(generate(new_tokens), repeats)
        first = best_time(generate(1), repeats)
    decode = (full - first) / (new_tokens - 1)
    return {"length": length, "use_cache": use_cache, "seconds_total": full, "seconds_prefill_and_first": first,
            "ms_per_decoded_token": 1e3 * decode, "decode_tokens_per_s": 1 / decode,
            "end_to_end_tokens_per_s": new_tokens / full}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="benchmarks/results/generation.json")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results = {"settings": vars(args), "machine": {"processor": platform.processor(), "torch": torch.__version__,
                                                   "threads": torch.get_num_threads()}, "models": {}}
    for name, spiking in (("spiking", True), ("real_valued", False)):
        model = build(args, spiking)
        sample = torch.randint(0, args.vocab_size, (1, 32))
        rows = [measure(model, length, args.new_tokens, use_cache, args.repeats)
                for length in args.lengths for use_cache in (True, False)]
        results["models"][name] = {"num_steps": model.config.effective_num_steps,
                                   "cache_bytes_per_token": cache_bytes_per_token(model, sample), "runs": rows}
        print(f"\n{name} (T={model.config.effective_num_steps}, hidden {args.hidden_size}, {args.layers} layers, "
              f"vocab {args.vocab_size}); cache {results['models'][name]['cache_bytes_per_token']:.0f} bytes/token")
        print(f"{'length':>7} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speed-up':>9} {'cache ms/tok':>13}")
        for length in args.lengths:
            cached, uncached = (next(r for r in rows if r["length"] == length and r["use_cache"] == c)
                                for c in (True, False))
            print(f"{length:>7} {cached['decode_tokens_per_s']:>12.1f} {uncached['decode_tokens_per_s']:>15.1f} "
                  f"{cached['decode_tokens_per_s'] / uncached['decode_tokens_per_s']:>8.1f}x "
                  f"{cached['ms_per_decoded_token']:>13.2f}")
    # what a real-valued fp16 cache would hold: K and V, hidden_size each, 2 bytes, per layer
    results["fp16_real_valued_cache_bytes_per_token"] = 2 * args.hidden_size * 2 * args.layers
    print(f"\nreal-valued fp16 cache for reference: {results['fp16_real_valued_cache_bytes_per_token']} bytes/token")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
