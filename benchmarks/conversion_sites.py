"""Where the perplexity of a spiking conversion goes: convert SmolLM2-135M (or another ``--model``) once with a
recipe, then let one kind of neuron site at a time pass its input through unspiked, and score the same Brown tokens
each time.

    python benchmarks/conversion_sites.py --output runs/sites.jsonl [--recipe gif] [--tokens 2048] [--model NAME]

One JSON line per row (``"bypass"``: the site kind left real-valued, ``none`` for the full conversion, ``all`` for
every site: the real-valued model). Calibration as ``conversion_ladder.py`` (the default ``pypi`` corpus); where
the architecture cannot fold the residual-stream rotation (Gemma-3), spikify drops it, saying so.
``--bos``: windows of ``<bos>`` + 511 tokens (``conversion_ladder.bos_windows``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--recipe", default="gif")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m", help="a named source or a model directory")
    parser.add_argument("--bos", action="store_true", help="score <bos>-prefixed windows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spikelm
    from spikelm.conversion.placement import placement
    from spikelm.conversion.recipes import RECIPES
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.evaluation.brown_perplexity import brown_eval_tokens, perplexity

    sys.path.insert(0, str(Path(__file__).parent))
    from conversion_ladder import bos_windows, calibration_ids

    source = resolve_model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = brown_eval_tokens(tokenizer, args.tokens)
    if args.bos:
        tokens = bos_windows(tokens, tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    calibration = calibration_ids(tokenizer, args.calibration_sequences)
    spikelm.spikify(model, dict(RECIPES[args.recipe]), calibration=list(calibration.split(4)))
    sites = placement(model)
    modules = dict(model.named_modules())
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def score(label: str) -> None:
        started = time.perf_counter()
        result = perplexity(model, tokens, window=512, stride=512, batch_size=4)
        record = {
            "model": args.model,
            "recipe": args.recipe,
            "bos": args.bos,
            "bypass": label,
            "perplexity": result["perplexity"],
            "tokens": int(tokens.numel()),
            "window": 512,
            "stride": 512,
            "calibration": f"{args.calibration_sequences} x 512 pypi tokens",
            "seconds": round(time.perf_counter() - started, 1),
        }
        with output.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    def passthrough(x, *rest, **kwargs):
        return x

    score("none")
    for kind in sorted({site.kind for site in sites}):
        chosen = [modules[site.name] for site in sites if site.kind == kind]
        for neuron in chosen:
            neuron.forward = passthrough  # an instance attribute: nn.Module.__call__ runs it instead
        score(kind)
        for neuron in chosen:
            del neuron.forward


if __name__ == "__main__":
    main()
