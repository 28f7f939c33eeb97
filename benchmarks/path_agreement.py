"""One model whatever the path: a converted model's logits through every code path, side by side.

    python -m benchmarks.path_agreement --model DIR [--model DIR ...] --output results.json [--new-tokens 16]

For each converted model directory (``spikelm spikify`` output, or any spiking model ``from_pretrained`` loads) and
each prompt length (3, 8, 20 and 100 tokens of a fixed English text), in float32 on the CPU:

* ``kernels``: the full forward pass (``use_cache=False``) with the C++ kernels on vs off, max |logit difference|;
* ``cached_vs_full``: greedy ``generate()`` with the cache (kernels on and off), each decoding step's logits against
  the full forward pass of the same sequence, max |difference|;
* ``greedy``: the ``--new-tokens`` greedy tokens with the cache vs without (``use_cache=False``), kernels on and off:
  how many agree (and the first position where they part, if any).

Prints one line per measurement and writes every figure to ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

TEXT = (
    "In 1887 the railway company extended its line from the harbour to the mining villages of the upper valley, "
    "and within a decade the population had doubled. The new stations were built of the local grey stone, with "
    "slate roofs and long wooden platforms, and each had a small garden tended by the station master's family. "
    "Goods trains carried coal down to the quays by night, while the morning passenger service brought farmers, "
    "teachers and clerks into the market town. When the last pit closed in 1968 the line was cut back to the "
    "junction, and most of the old buildings were sold as houses or left to the weather."
)
LENGTHS = (3, 8, 20, 100)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def measure(directory: str, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spikelm  # noqa: F401  (registers the spiking quantizer)
    from spikelm.nn import kernels as dispatcher

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    if ids.shape[1] < max(LENGTHS):
        raise SystemExit(f"the fixed text has only {ids.shape[1]} tokens with this tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = dict(do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)
    report = {"model": directory, "attention": model.config._attn_implementation, "prompts": []}
    for length in LENGTHS:
        prompt = ids[:, :length]
        row = {"prompt_tokens": length}
        full = {}
        for kernels in (True, False):
            dispatcher.set_enabled(kernels)
            full[kernels] = model(prompt, use_cache=False).logits
            cached = model.generate(prompt, use_cache=True, return_dict_in_generate=True, output_logits=True, **gen)
            sequence = cached.sequences
            whole = model(sequence, use_cache=False).logits[:, length - 1 : -1]
            steps = torch.stack(cached.logits, 1)
            uncached = model.generate(prompt, use_cache=False, **gen)
            same = (uncached[0, length:] == sequence[0, length:]).tolist()
            name = "on" if kernels else "off"
            row[f"cached_vs_full_{name}"] = _max_diff(steps, whole)
            row[f"greedy_agree_{name}"] = sum(same)
            row[f"greedy_first_difference_{name}"] = same.index(False) if not all(same) else None
            row[f"continuation_{name}"] = tokenizer.decode(sequence[0, length:])
        dispatcher.set_enabled(None)
        row["kernels_on_vs_off"] = _max_diff(full[True], full[False])
        report["prompts"].append(row)
        print(
            f"{Path(directory).name}: prompt {length:3d}: kernels on vs off {row['kernels_on_vs_off']:.2e}; "
            f"cached step vs full forward {row['cached_vs_full_on']:.2e} (on) {row['cached_vs_full_off']:.2e} (off); "
            f"cached == uncached greedy {row['greedy_agree_on']}/{new_tokens} (on) "
            f"{row['greedy_agree_off']}/{new_tokens} (off)",
            flush=True,
        )
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="converted model directory (repeatable)")
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    results = {
        "settings": {
            "dtype": "float32",
            "device": "cpu",
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "prompt_lengths": list(LENGTHS),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "models": [measure(directory, args.new_tokens) for directory in args.model],
    }
    results["seconds"] = round(time.time() - start, 1)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
