"""The perplexity-energy frontier on SmolLM2-135M: perplexity on Brown and compute energy per token of a ladder of
recipes (signed multi-level spikes at several bit widths, group sizes, dead zones, saliency; GIF; ternary elastic).

    python benchmarks/energy_frontier.py --output benchmarks/results/energy_frontier_4k.jsonl --tokens 4096 \
        --calibration-sequences 8 [--rows real,s4-g64,...] [--energy-windows 2]
    python benchmarks/energy_frontier.py --plot benchmarks/results/energy_frontier_4k.jsonl \
        --figure docs/images/energy_frontier.png

Each row loads the real-valued model afresh and converts it as ``benchmarks/conversion_ladder.py`` does (calibration:
the first ``--calibration-sequences`` x 512 tokens of the default ``pypi`` corpus, never evaluation text), scores the
first ``--tokens`` Brown tokens (windows of 512, stride 512), then counts the energy with the counter behind
``spikelm energy`` (:func:`spikelm.evaluation.energy.measure_energy`) on the first ``--energy-windows`` windows of
the same tokens: the headline (products inside the blocks) and the whole model, per token, against the real-valued
source's, and appends one JSON line (a rerun skips finished rows). ``--plot`` draws perplexity ratio against energy
ratio (fp32 ANN at 1; an int8 ANN at 0.23 / 4.6 pJ per MAC, Horowitz 45 nm) with the targets of docs/CONVERSION.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversion_ladder import ROWS as LADDER  # noqa: E402
from conversion_ladder import TRANSFORM, calibration_ids  # noqa: E402

SIGNED = dict(neuron="signed", signed_group_size=64, signed_clip_ratio=0.9, **TRANSFORM)


def signed(bits: int, **more) -> dict:
    return {**SIGNED, "signed_bits": bits, **more}


def with_outliers(ratio: float) -> dict:
    """The value-rotated, salient, unclipped 4-bit row with outlier tokens above ``ratio`` x the calibration median
    (the default recipe at ratio 2)."""
    return signed(
        4,
        signed_salient_bits=5,
        saliency_fraction=0.1,
        signed_clip_ratio=1.0,
        value_rotation=True,
        signed_outlier_ratio=ratio,
    )


ROWS = {
    "real": None,
    "gif-default": LADDER["gif-t2-g64"],  # the default recipe before this ladder
    "s4-g64": signed(4),
    "s5-g64": signed(5),
    "s3-g64": signed(3),
    "s2-g64": signed(2),
    "s4-g32": signed(4, signed_group_size=32),
    "s4-g16": signed(4, signed_group_size=16),
    "s4-g128": signed(4, signed_group_size=128),
    "s4-g64-clip1": signed(4, signed_clip_ratio=1.0),
    "s4-g64-clip0.8": signed(4, signed_clip_ratio=0.8),
    "s4-g64-t2": signed(4, signed_steps=2),  # same codes as s4-g64, spikes of at most 4 levels
    "s4-g64-sal6-5": signed(4, signed_salient_bits=6, saliency_fraction=0.05),
    "s4-g64-sal5-10": signed(4, signed_salient_bits=5, saliency_fraction=0.1),
    "s4-g64-sal5-10-clip1": signed(4, signed_salient_bits=5, saliency_fraction=0.1, signed_clip_ratio=1.0),
    # the best row above with the attention's values and output rotated per head (value_rotation, docs/CONVERSION.md)
    "s4-g64-sal5-10-clip1-vo": signed(
        4, signed_salient_bits=5, saliency_fraction=0.1, signed_clip_ratio=1.0, value_rotation=True
    ),
    "s4-g64-clip1-vo": signed(4, signed_clip_ratio=1.0, value_rotation=True),  # the same without saliency
    # + outlier tokens: a token whose max |x| at a linear input exceeds 4 (8) x the calibration median passes
    # real-valued there (signed_outlier_ratio; docs/CONVERSION.md, "Outlier tokens")
    "s4-g64-sal5-10-clip1-vo-out4": with_outliers(4.0),
    "s4-g64-sal5-10-clip1-vo-out8": with_outliers(8.0),
    # lower thresholds: more tokens real-valued (the share of tokens flagged, and their multiplies, grow)
    "s4-g64-sal5-10-clip1-vo-out2.5": with_outliers(2.5),
    "s4-g64-sal5-10-clip1-vo-out2": with_outliers(2.0),
    "s4-g64-sal5-10-clip1-out4": signed(
        4, signed_salient_bits=5, saliency_fraction=0.1, signed_clip_ratio=1.0, signed_outlier_ratio=4.0
    ),
    "s4-g64-sal5-10-clip0.95-vo": signed(
        4, signed_salient_bits=5, saliency_fraction=0.1, signed_clip_ratio=0.95, value_rotation=True
    ),
    "s4-g64-sal5-10-clip0.95": signed(4, signed_salient_bits=5, saliency_fraction=0.1, signed_clip_ratio=0.95),
    "s4-g64-sal8-2": signed(4, signed_salient_bits=8, saliency_fraction=0.02),
    "s4-g32-sal6-5": signed(4, signed_group_size=32, signed_salient_bits=6, saliency_fraction=0.05),
    "s4-g64-kv5": signed(4, signed_site_bits={"k": 5, "v": 5}),
    "s4-g32-sal5-10": signed(4, signed_group_size=32, signed_salient_bits=5, saliency_fraction=0.1),
    "s4-g64-sal5-10-dz0.75": signed(4, signed_salient_bits=5, saliency_fraction=0.1, signed_dead_zone=0.75),
    "s4-g64-sal5-10-o5-kv3": signed(  # the o_proj input at 5 bits (a sensitive, small site), K/V at 3 (cheap in ppl)
        4, signed_salient_bits=5, saliency_fraction=0.1, signed_site_bits={"o_input": 5, "k": 3, "v": 3}
    ),
    "s4-g64-sal5-10-kv5": signed(4, signed_salient_bits=5, saliency_fraction=0.1, signed_site_bits={"k": 5, "v": 5}),
    "s4-g64-down5": signed(4, signed_site_bits={"down_input": 5}),
    "s4-g64-qkv5": signed(4, signed_site_bits={"qkv_input": 5}),
    "s5-g64-dz0.75": signed(5, signed_dead_zone=0.75),
    "s5-g64-dz0.9": signed(5, signed_dead_zone=0.9),
    "s5-g64-clip0.8": signed(5, signed_clip_ratio=0.8),
    "s5-g32-dz0.9": signed(5, signed_group_size=32, signed_dead_zone=0.9),
    "ternary-t4": LADDER["ternary-t4-rot-sym"],
}
INT8_ANN = 0.23 / 4.6  # an int8 MAC against an fp32 one (Horowitz, 45 nm)


def needs_calibration(config: dict | None) -> bool:
    """A signed neuron without saliency has no data-dependent state (its scales are per token): no calibration pass.
    GIF (saliency) and elastic (alphas) need one; so does smoothing."""
    if config is None:
        return False
    salient = config.get("signed_salient_bits") is not None and config.get("saliency_fraction", 0) > 0
    return config.get("neuron") != "signed" or salient or config.get("smoothing_alpha") is not None


def energy_of(model, tokens: torch.Tensor, windows: int) -> dict:
    from spikelm.evaluation.energy import measure_energy

    batches = [{"input_ids": tokens[i * 512 : (i + 1) * 512].view(1, 512)} for i in range(windows)]
    summary = measure_energy(model, batches)
    whole = summary["whole_model"]
    levels = sum(sum(n["levels_per_step"]) for n in summary["neurons"].values()) if summary["spiking"] else None
    slots = None
    return {
        "snn_uJ_per_token": None if summary["snn_mJ_per_token"] is None else summary["snn_mJ_per_token"] * 1e3,
        "ann_uJ_per_token": summary["ann_mJ_per_token"] * 1e3,
        "energy_ratio": None if not summary["spiking"] else summary["snn_mJ_per_token"] / summary["ann_mJ_per_token"],
        "whole_snn_uJ_per_token": None if whole["snn_mJ_per_token"] is None else whole["snn_mJ_per_token"] * 1e3,
        "whole_ann_uJ_per_token": whole["ann_mJ_per_token"] * 1e3,
        "whole_energy_ratio": None if not summary["spiking"] else whole["snn_mJ_per_token"] / whole["ann_mJ_per_token"],
        "acs_per_token": None if summary["acs"] is None else summary["acs"] / summary["tokens_per_sequence"],
        "macs_per_token": None if summary["macs"] is None else summary["macs"] / summary["tokens_per_sequence"],
        "ann_macs_per_token": summary["ann_macs"] / summary["tokens_per_sequence"],
        "mean_firing_rate": summary["mean_firing_rate"],
        "levels_per_sequence": levels,
        "slots": slots,
        "energy_tokens": windows * 512,
        # the energy report's same-weight-precision and memory-inclusive ratios (spiking / real-valued), when present
        "precision_ratios": {
            name: {scope: p[scope].get("snn_over_ann") for scope in p if isinstance(p[scope], dict)}
            for name, p in summary.get("precisions", {}).items()
        },
    }


def run(args) -> None:
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spikelm
    import spikelm.evaluation.energy  # noqa: F401  (every module loaded before the first row: a long run reads one tree)
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.evaluation.brown_perplexity import brown_eval_tokens, perplexity

    source = resolve_model_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = brown_eval_tokens(tokenizer, args.tokens)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["row"] for line in output.read_text().splitlines()} if output.exists() else set()
    calibration = calibration_ids(tokenizer, args.calibration_sequences)
    for row in args.rows.split(","):
        if row in done:
            continue
        config = ROWS[row]
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        calibrated = needs_calibration(config)
        if config is not None:
            spikelm.spikify(model, dict(config), calibration=list(calibration.split(4)) if calibrated else None)
        convert_s = time.perf_counter() - started
        result = perplexity(model, tokens, window=512, stride=512, batch_size=4)
        started = time.perf_counter()
        energy = energy_of(model, tokens, args.energy_windows)
        record = {
            "row": row,
            "config": config,
            "perplexity": result["perplexity"],
            "tokens": int(tokens.numel()),
            "window": 512,
            "stride": 512,
            "calibration": f"{args.calibration_sequences} x 512 pypi tokens"
            if calibrated
            else "none (a signed neuron without saliency has nothing to calibrate)",
            **energy,
            "convert_seconds": round(convert_s, 1),
            "eval_seconds": round(result["seconds"], 1),
            "energy_seconds": round(time.perf_counter() - started, 1),
            "threads": args.threads,
        }
        with output.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            json.dumps(
                {k: record[k] for k in ("row", "perplexity", "energy_ratio", "snn_uJ_per_token", "eval_seconds")}
            ),
            flush=True,
        )
        del model


def plot(path: str, figure: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    real = next(r for r in rows if r["row"] == "real")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    # the rows near the targets' corner crowd one spot: drawn again, labelled, in a zoomed inset
    zoom_x, zoom_y = (0.575, 0.615), (1.35, 1.43)

    def near(energy: float, ratio: float) -> bool:
        return zoom_x[0] <= energy <= zoom_x[1] and zoom_y[0] <= ratio <= zoom_y[1]

    crowded, labelled = [], []
    for r in rows:
        if r["energy_ratio"] is None:
            continue
        ratio = r["perplexity"] / real["perplexity"]
        if ratio > 2.1:
            ax.annotate(f"{r['row']} ({ratio:.0f}x)", (r["energy_ratio"], 2.1), fontsize=7, rotation=90, va="top")
            continue
        name = r["row"]
        color = {"s": "tab:green", "g": "tab:red", "r": "black"}.get(name[0], "tab:purple")
        ax.scatter(
            r["energy_ratio"], ratio, color=color, s=40 if name == "real" else 18, marker="*" if name == "real" else "o"
        )
        if near(r["energy_ratio"], ratio):
            crowded.append((r["energy_ratio"], ratio, name, color))
        else:  # a label near an earlier one (the same codes at another T, a dead zone's small step) goes below it
            shift = 9 * sum(abs(e - r["energy_ratio"]) < 0.1 and abs(q - ratio) < 0.03 for e, q in labelled)
            labelled.append((r["energy_ratio"], ratio))
            ax.annotate(name, (r["energy_ratio"], ratio), fontsize=7, xytext=(3, 2 - shift), textcoords="offset points")
    if len(crowded) > 1:
        inset = ax.inset_axes([0.6, 0.47, 0.36, 0.31])
        inset.add_patch(plt.Rectangle((0, 1), 0.6, 0.38, color="tab:green", alpha=0.12))
        previous = None
        for energy, ratio, name, color in sorted(crowded, key=lambda c: (c[1], c[0])):
            inset.scatter(energy, ratio, color=color, s=14)
            # points at (nearly) the same perplexity: labels stacked, not drawn over each other
            shift = 0 if previous is None or ratio - previous[0] > 0.004 else previous[1] + 8
            previous = (ratio, shift)
            inset.annotate(name, (energy, ratio), fontsize=6, xytext=(3, 1 + shift), textcoords="offset points")
        inset.set_xlim(*zoom_x)
        inset.set_ylim(*zoom_y)
        inset.tick_params(labelsize=6)
        ax.indicate_inset_zoom(inset, edgecolor="gray")
    elif crowded:
        energy, ratio, name, _ = crowded[0]
        ax.annotate(name, (energy, ratio), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.axvline(1.0, color="black", lw=1, label="fp32 ANN (the source)")
    ax.axvline(INT8_ANN, color="gray", lw=1, ls="--", label="int8 ANN (0.23 / 4.6 pJ per MAC)")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.add_patch(plt.Rectangle((0, 1), 0.6, 0.38, color="tab:green", alpha=0.08, label="target: <= 1.38x, <= 0.6x"))
    ax.set_xlabel("compute energy per token inside the blocks / fp32 source's (45 nm: 0.9 pJ AC, 4.6 pJ MAC)")
    ax.set_ylabel("perplexity / real-valued model's")
    ax.set_xlim(0, max(1.8, max(r["energy_ratio"] or 0 for r in rows) * 1.05))
    ax.set_ylim(0.95, 2.1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--energy-windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", help="a JSONL written by this script: draw it to --figure")
    parser.add_argument("--figure", default="docs/images/energy_frontier.png")
    parser.add_argument("--title", default="SmolLM2-135M, training-free, Brown")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.figure, args.title)
    else:
        run(args)


if __name__ == "__main__":
    main()
