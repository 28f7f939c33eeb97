"""The conversion ladder on a real pretrained LLM: perplexity of SmolLM2-135M (or another ``--model``) and of its
spiking conversions on the same Brown tokens, plus generation speed and greedy continuations.

    python benchmarks/conversion_ladder.py --output runs/ladder.jsonl [--tokens 32768] [--rows real,gif-t2,...]
        [--model smollm2-135m|gemma3-270m|DIR] [--bos]

Every row loads the real-valued model afresh, converts it with ``spikelm.spikify`` (calibration: the first
``--calibration-sequences`` x 512 tokens of the default ``pypi`` corpus, never evaluation text), scores the first
``--tokens`` tokens of the Brown text (windows of 512, stride 512) and appends one JSON line to ``--output``, so an
interrupted run keeps its finished rows (rerunning skips them). ``--bos`` scores the same text a second way as
well (``perplexity_bos``): windows of ``<bos>`` + 511 Brown tokens, every one of those tokens scored (the first
``tokens`` // 511 x 511 tokens), as a model trained always to see ``<bos>`` first (Gemma) is meant to be used.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TRANSFORM = dict(rotation="hadamard", online_down_proj_rotation=True)  # the default outlier transform
GIF_T2 = dict(neuron="gif", gif_bits=4, gif_extra_bits=1, saliency_fraction=0.1)  # SpikeLLM's T=2 setting
GIF_T4 = dict(neuron="gif", gif_bits=4, gif_extra_bits=2, saliency_fraction=0.05)  # SpikeLLM's T=4 setting
ROWS = {
    "real": None,
    # the GIF recipe (spikelm.conversion.recipes.RECIPES), spikify's default until the signed recipe: the row keeps
    # its name for the stored results (the signed default's rows: benchmarks/energy_frontier.py)
    "default": "gif",
    # the GIF recipe + an online Hadamard on the q/k/v, o_proj and gate/up inputs (folded into their readers):
    # exact where the residual-stream rotation is not (Gemma-3's post norms); an experiment, not a saved recipe
    "default-online-inputs": "gif+online-inputs",
    "gif-t2": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9},  # the default before range groups (gif_group_size=0)
    "gif-t2-nosal": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9, "saliency_fraction": 0.0},
    "gif-t4": {**GIF_T4, **TRANSFORM, "gif_clip_ratio": 0.9},
    "gif-t4-nosal": {**GIF_T4, **TRANSFORM, "gif_clip_ratio": 0.9, "saliency_fraction": 0.0},
    "gif-t2-g32": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9, "gif_group_size": 32},  # ranges per 32 channels
    "gif-t2-g64": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9, "gif_group_size": 64},  # the default recipe
    "gif-t2-g128": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9, "gif_group_size": 128},
    "gif-t2-smooth": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9, "smoothing_alpha": 0.5},  # + SmoothQuant
    "gif-t2-g32-smooth": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9, "gif_group_size": 32, "smoothing_alpha": 0.5},
    "gif-t2-g64-smooth": {**GIF_T2, **TRANSFORM, "gif_clip_ratio": 0.9, "gif_group_size": 64, "smoothing_alpha": 0.5},
    "gif-t2-noclip": {**GIF_T2, **TRANSFORM},
    "gif-t2-notransform": {**GIF_T2},
    "gif-t2-spikellm": {**GIF_T2, "gif_group_range": "token"},  # as SpikeLLM's released code: whole-token ranges
    "gif-t2-spikellm-nosal": {**GIF_T2, "gif_group_range": "token", "saliency_fraction": 0.0},
    "ternary-t1": dict(neuron="elastic", num_steps=1),
    "ternary-t2": dict(neuron="elastic", num_steps=2),
    "ternary-t4": dict(neuron="elastic", num_steps=4),
    "ternary-t4-rot": dict(neuron="elastic", num_steps=4, **TRANSFORM),
    "ternary-t4-rot-sym": dict(neuron="elastic", num_steps=4, reset="symmetric", **TRANSFORM),
}
PROMPTS = ("The capital of France is", "Once upon a time, there was a", "The most important thing about science is")


def calibration_ids(tokenizer, sequences: int, length: int = 512) -> torch.Tensor:
    from spikelm.data.corpora import load_corpus

    corpus = load_corpus("pypi")
    ids: list[int] = []
    for text in corpus["train"]["text"]:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) >= sequences * length:
            break
    return torch.tensor(ids[: sequences * length]).view(sequences, length)


@torch.no_grad()
def generation(model, tokenizer, new_tokens: int) -> dict:
    texts, speeds = {}, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        start = time.perf_counter()
        out = model.generate(
            **ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.eos_token_id,
        )
        seconds = time.perf_counter() - start
        speeds.append(new_tokens / seconds)
        texts[prompt] = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    return {"continuations": texts, "tokens_per_s": sorted(speeds)[len(speeds) // 2]}


def bos_windows(tokens: torch.Tensor, bos: int, window: int = 512) -> torch.Tensor:
    """``tokens`` cut into chunks of ``window - 1``, each after a ``bos``: a 1-D tensor whose disjoint windows of
    ``window`` (stride ``window``) are ``<bos>`` + chunk, so that every chunk token is scored and ``<bos>`` only
    conditions (a partial last chunk is dropped)."""
    chunks = tokens[: tokens.numel() // (window - 1) * (window - 1)].view(-1, window - 1)
    return torch.cat([torch.full((chunks.shape[0], 1), bos, dtype=tokens.dtype), chunks], 1).view(-1)


def row_config(row: str) -> dict | None:
    config = ROWS[row]
    if isinstance(config, str):
        from spikelm.conversion.recipes import RECIPES

        return dict(RECIPES[config.split("+")[0]])
    return None if config is None else dict(config)


def _rotate_site_input(host, args, kwargs):
    if args:
        return (host.site_rotation(args[0]), *args[1:]), kwargs
    kwargs["hidden_states"] = host.site_rotation(kwargs["hidden_states"])
    return args, kwargs


@torch.no_grad()
def attach_online_input_rotations(model, seed: int = 2, kinds=("qkv_input", "o_input", "gate_up_input")) -> int:
    """Rotate the input of each listed site online (``x <- x Q``, an ``OnlineHadamard`` pre-hook on the site's host,
    placed first) and fold ``Q`` into the linears reading it (``W <- W Q``): the real-valued function is unchanged.
    Call before ``spikify``, so that the neurons (hooked after) and their calibration see the rotated input."""
    from spikelm.conversion.placement import family_of
    from spikelm.conversion.rotation import OnlineHadamard, rotation_matrix

    family, count = family_of(model), 0
    for layer in model.base_model.get_submodule(family.layers):
        for site in family.sites:
            if site.kind not in kinds:
                continue
            host, readers = layer.get_submodule(site.host), [layer.get_submodule(r) for r in site.readers]
            size = readers[0].in_features
            q = rotation_matrix(size, "hadamard", seed)[0].to(readers[0].weight.device)
            for reader in readers:
                reader.weight.copy_((reader.weight.double() @ q).to(reader.weight.dtype))
            host.site_rotation = OnlineHadamard(size, seed)
            host.register_forward_pre_hook(_rotate_site_input, with_kwargs=True, prepend=True)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m", help="a named source or a model directory")
    parser.add_argument("--bos", action="store_true", help="also score <bos>-prefixed windows (perplexity_bos)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spikelm
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.evaluation.brown_perplexity import brown_eval_tokens, perplexity

    source = resolve_model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = brown_eval_tokens(tokenizer, args.tokens)
    calibration = None
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["row"] for line in output.read_text().splitlines()} if output.exists() else set()
    for row in args.rows.split(","):
        if row in done:
            continue
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        config, extra_config = row_config(row), {}
        if isinstance(ROWS[row], str) and ROWS[row].endswith("+online-inputs"):
            attach_online_input_rotations(model)
        if config is not None:
            if calibration is None:
                calibration = calibration_ids(tokenizer, args.calibration_sequences)
            spikelm.spikify(model, dict(config), calibration=list(calibration.split(4)))
            applied = model.config.quantization_config  # spikify drops a rotation the architecture cannot fold
            extra_config = {k: getattr(applied, k) for k in ("rotation", "online_down_proj_rotation")}
        convert_s = time.perf_counter() - started
        result = perplexity(model, tokens, window=512, stride=512, batch_size=4)
        extra = {}
        if args.bos:
            with_bos = perplexity(
                model, bos_windows(tokens, tokenizer.bos_token_id), window=512, stride=512, batch_size=4
            )
            extra = {"perplexity_bos": with_bos["perplexity"], "tokens_scored_bos": with_bos["tokens_scored"]}
        gen = generation(model, tokenizer, args.new_tokens)
        record = {
            "row": row,
            "model": args.model,
            "config": config,
            **({"applied": extra_config} if extra_config else {}),
            "perplexity": result["perplexity"],
            **extra,
            "tokens": int(tokens.numel()),
            "tokens_scored": result.get("tokens_scored"),
            "window": 512,
            "stride": 512,
            "calibration": f"{args.calibration_sequences} x 512 pypi tokens",
            "convert_seconds": round(convert_s, 1),
            "eval_seconds": round(result["seconds"], 1),
            "threads": args.threads,
            **gen,
        }
        with output.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: record[k] for k in ("row", "perplexity", "eval_seconds", "tokens_per_s")}), flush=True)


if __name__ == "__main__":
    main()
