"""The energy report: a markdown page stating the formula and constants with every figure, and plots.

Input is the dict of :func:`spikelm.evaluation.energy.summarize` (plus the ``model``/``input`` descriptions the
command adds); matplotlib draws without a display (no pyplot state).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from spikelm.errors import UserError
from spikelm.outputs import write_text_atomic

HEATMAP = "firing_rate_heatmap.png"
SIGNS = "spike_signs.png"
BY_TYPE = "energy_by_layer_type.png"


# ----------------------------------------------------------------------------------------------
# What is measured: text cut into full windows, batched
# ----------------------------------------------------------------------------------------------


def pack_windows(text: str, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of ``text`` cut into full windows of ``max_length`` tokens, special tokens included.

    Each window is wrapped in the tokenizer's own single-sequence template (``[CLS] ... [SEP]`` for BERT).
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(wrapped)) if wrapped[i : i + len(plain)] == plain)
    prefix, suffix = wrapped[:start], wrapped[start + len(plain) :]
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise UserError(f"--max-length {max_length} leaves no room for text after the special tokens")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return [prefix + ids[i : i + body] + suffix for i in range(0, len(ids) - body + 1, body)]


def padded_batches(features: list[dict], tokenizer, batch_size: int):
    """Batches of model inputs, each padded to its longest example, with an ``attention_mask``.

    Batches of equal-length examples (the text windows) are not padded, so a tokenizer without a
    padding token (GPT-2's) serves them too.
    """
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        ragged = len({len(f["input_ids"]) for f in chunk}) > 1
        yield dict(tokenizer.pad(chunk, padding="longest" if ragged else False, return_tensors="pt"))


def _count(x: float) -> str:
    """An operation count with an SI prefix: ``11.17 G``, ``294.9 k``."""
    for scale, prefix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{prefix}"
    return f"{x:.4g}"


def _steps(values) -> str:
    return " ".join(f"{v:.3f}" for v in values) if values else "-"


def _label(entry: dict) -> str:
    """``3 attention.self.qkv`` for ``bert.encoder.layer.3.attention.self.qkv``."""
    block = (entry.get("block") or "").rsplit(".", 1)[-1]
    return f"{block} {entry['group']}".strip()


def by_layer_type(summary: dict) -> list[dict]:
    """The headline products summed over the blocks, per layer type (``group``), in forward order."""
    groups: dict[str, dict] = {}
    rates = defaultdict(list)
    for e in summary["per_layer"]:
        g = groups.setdefault(
            e["group"],
            {
                "group": e["group"],
                "kind": e["kind"],
                "acs": 0.0,
                "macs": 0.0,
                "ann_macs": 0.0,
                "snn_mJ": 0.0,
                "ann_mJ": 0.0,
            },
        )
        for key in ("acs", "macs", "ann_macs", "snn_mJ", "ann_mJ"):
            g[key] += e[key]
        if e["firing_rate"]:
            rates[e["group"]].append(sum(e["firing_rate"]) / len(e["firing_rate"]))
    for name, g in groups.items():
        g["mean_firing_rate"] = sum(rates[name]) / len(rates[name]) if rates[name] else None
    return list(groups.values())


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def plot_firing_heatmap(summary: dict, path: Path) -> None:
    layers = [e for e in summary["per_layer"] if e["firing_rate"]]
    steps = len(layers[0]["firing_rate"])
    fig = Figure(figsize=(2.2 + 1.1 * steps, 1.2 + 0.16 * len(layers)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        [e["firing_rate"] for e in layers], aspect="auto", cmap="viridis", vmin=0, interpolation="nearest"
    )
    ax.set_xticks(range(steps), [f"t={t}" for t in range(steps)])
    ax.set_yticks(range(len(layers)), [_label(e) for e in layers], fontsize=6)
    ax.set_xlabel("time step")
    ax.set_title("firing rate (nonzero spikes / slots)\nper spiking operand, real tokens", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.6)
    fig.savefig(path, dpi=120)


def plot_spike_signs(summary: dict, path: Path) -> None:
    neg, pos = summary["negative_rate_per_step"], summary["positive_rate_per_step"]
    steps = range(len(pos))
    width = 0.27
    fig = Figure(figsize=(1.8 + 1.2 * len(pos), 3.2), layout="constrained")
    ax = fig.add_subplot()
    for offset, values, label, color in (
        (-width, neg, "-1", "tab:blue"),
        (0.0, [1 - p - n for p, n in zip(pos, neg, strict=True)], "0", "tab:gray"),
        (width, pos, "+1", "tab:red"),
    ):
        bars = ax.bar([t + offset for t in steps], values, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(steps), [f"t={t}" for t in steps])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("fraction of spike slots")
    ax.set_title("spike values over every neuron (K/V re-spiking included)", fontsize=9)
    ax.legend(title="spike", fontsize=8)
    fig.savefig(path, dpi=120)


def plot_energy_by_type(summary: dict, path: Path) -> None:
    groups = by_layer_type(summary)
    x = range(len(groups))
    fig = Figure(figsize=(1.6 + 1.1 * len(groups), 3.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.4
    if summary["spiking"]:
        bars = ax.bar([i - width / 2 for i in x], [g["snn_mJ"] for g in groups], width, label="SNN (this model)")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    bars = ax.bar([i + width / 2 for i in x], [g["ann_mJ"] for g in groups], width, label="ANN (same shape)")
    ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(list(x), [g["group"].replace(".", "\n", 1) for g in groups], fontsize=7)
    ax.set_ylabel("mJ per sequence (all blocks)")
    ax.set_title(
        f"energy by layer type; E_AC = {summary['constants_pJ']['ac']} pJ, E_MAC = {summary['constants_pJ']['mac']} pJ",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def markdown_report(summary: dict, plots: list[str]) -> str:
    c = summary["constants_pJ"]
    spiking = summary["spiking"]
    lines = [f"# Energy estimate: {summary.get('model', 'model')}", ""]
    if "description" in summary:
        lines += [summary["description"], ""]
    lines += [
        f"**Formula**: `{summary['formula']}`, with E_AC = {c['ac']} pJ per accumulate and E_MAC = {c['mac']} pJ "
        "per multiply-accumulate (32-bit float, 45 nm).",
        "",
        f"**Convention**: {summary['convention']}.",
        "",
        f"Input: {summary['num_sequences']} sequences of {summary.get('sequence_length', '?')} tokens "
        f"({summary['tokens_per_sequence']:.1f} real tokens per sequence on average); figures are per sequence, "
        "averaged over the sequences.",
        "",
    ]
    if not spiking:
        lines += [
            "**This model is not spiking** (`spiking=False`): it runs real-valued, so only the ANN energy is reported.",
            "",
        ]
    if spiking and not summary["alpha_was_initialized"]:
        lines += [
            "Note: the model's spike amplitudes (alpha) were not initialised; they were set from the first "
            "batch of this input (alpha_t = 2 mean|u_t|).",
            "",
        ]
    snn = (lambda key, fmt: fmt(summary[key])) if spiking else (lambda key, fmt: "-")
    lines += [
        "| per sequence (headline) | SNN (this model) | ANN (same shape, real-valued) |",
        "|---|---|---|",
        f"| ACs | {snn('acs', _count)} | 0 |",
        f"| MACs | {snn('macs', _count)} | {_count(summary['ann_macs'])} |",
        f"| energy per sequence | {snn('snn_mJ_per_sequence', '{:.4g} mJ'.format)} | "
        f"{summary['ann_mJ_per_sequence']:.4g} mJ |",
        f"| energy per token | {snn('snn_mJ_per_token', lambda v: f'{v * 1e3:.2f} uJ')} | "
        f"{summary['ann_mJ_per_token'] * 1e3:.2f} uJ |",
        "",
    ]
    if spiking:
        lines += [
            f"**Ratio ANN / SNN: {summary['ratio']:.2f}x**. Mean firing rate (nonzero spikes / spike slots over "
            f"every neuron, K/V re-spiking included): **{summary['mean_firing_rate']:.4f}**; per step "
            f"{_steps(summary['firing_rate_per_step'])} (positive {_steps(summary['positive_rate_per_step'])}, "
            f"negative {_steps(summary['negative_rate_per_step'])}).",
            "",
        ]
    whole = summary.get("whole_model")
    if whole is not None:
        uj = lambda v: "-" if v is None else f"{v * 1e3:.2f} uJ"  # noqa: E731
        lines += [
            f"**Whole model** ({whole['convention']}):",
            "",
            "| | SNN (this model) | ANN |",
            "|---|---|---|",
            f"| per token | {uj(whole['snn_mJ_per_token'])} | {uj(whole['ann_mJ_per_token'])} |",
        ]
        generated = summary.get("per_generated_token")
        if generated is not None:
            g_whole = generated["whole_model"]
            lines += [
                f"| per generated token, blocks (one decode step after {generated['context_tokens']:.0f} cached "
                f"tokens) | {uj(generated['snn_mJ_per_sequence'])} | {uj(generated['ann_mJ_per_sequence'])} |",
                f"| per generated token, whole model | {uj(g_whole['snn_mJ_per_sequence'])} | "
                f"{uj(g_whole['ann_mJ_per_sequence'])} |",
            ]
        lines.append("")
    lines += precision_section(summary)
    lines += [
        "## By layer type (summed over the blocks)",
        "",
        "| layer type | kind | ACs | MACs | SNN mJ | ANN MACs | ANN mJ | firing rate (mean over layers, steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in by_layer_type(summary):
        rate = f"{g['mean_firing_rate']:.3f}" if g["mean_firing_rate"] is not None else "-"
        lines.append(
            f"| {g['group']} | {g['kind']} | {_count(g['acs'])} | {_count(g['macs'])} | "
            f"{g['snn_mJ'] if spiking else 0:.4g} | {_count(g['ann_macs'])} | {g['ann_mJ']:.4g} | {rate} |"
        )
    heads = summary["heads"]
    lines += [
        "",
        "## Outside the headline total",
        "",
        f"Pooler and heads (real-valued in both models, run once on the T-averaged output): "
        f"{_count(heads['macs'])} MACs = {heads['mJ']:.4g} mJ per sequence.",
        "",
    ]
    for e in heads["layers"]:
        lines.append(f"- `{e['name']}`: {_count(e['macs'])} MACs, {e['snn_mJ']:.4g} mJ")
    lines += [
        "",
        f"Element-wise operations per sequence ({summary['elementwise']['note']}):",
        "",
        "| operation | region | SNN elements | ANN elements |",
        "|---|---|---|---|",
    ]
    ew_snn, ew_ann = summary["elementwise"]["snn"], summary["elementwise"]["ann"]
    for region, ops in ew_ann.items():
        for op, count in ops.items():
            if count or (ew_snn and ew_snn[region][op]):
                snn_count = _count(ew_snn[region][op]) if ew_snn else "-"
                lines.append(f"| {op} | {region} | {snn_count} | {_count(count)} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if spiking:
        lines += [
            "",
            "## Per layer",
            "",
            "| product | kind | firing rate per step | alpha per step | ACs | MACs | SNN mJ |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in summary["per_layer"]:
            lines.append(
                f"| {e['name']} | {e['kind']} | {_steps(e['firing_rate'])} | {_steps(e['alpha'])} | "
                f"{_count(e['acs'])} | {_count(e['macs'])} | {e['snn_mJ']:.4g} |"
            )
    return "\n".join(lines) + "\n"


def precision_section(summary: dict) -> list[str]:
    """Markdown: both models at the same weight precision, compute only and memory-inclusive, and which figure is
    which (absent from summaries written before these fields existed)."""
    if "precisions" not in summary:
        return []
    spiking = summary["spiking"]
    memory = summary["memory"]
    uj = lambda v: "-" if v is None else f"{v * 1e3:.4g}"  # noqa: E731
    ratio = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "## Both models at the same weight precision (per token)",
        "",
        "A spiking model's accumulates add weights of the precision the real-valued model multiplies, so each row "
        "prices both models with the same precision's add (an AC) and multiply-add (a MAC), 45 nm (Horowitz, ISSCC "
        "2014). *with memory* adds every weight read per token at "
        f"{memory['pJ_per_bit']:.4g} pJ per bit x the weight bits ({memory['source']}).",
        "",
        "| precision | add / MAC pJ | scope | SNN uJ | ANN uJ | SNN / ANN |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in summary["precisions"].items():
        for scope in ("blocks", "whole_model", "blocks_with_memory", "whole_model_with_memory"):
            e = p[scope]
            lines.append(
                f"| {name} | {p['add_pJ']} / {p['mac_pJ']:.3g} | {scope.replace('_', ' ')} | "
                f"{uj(e['snn_mJ_per_token'])} | {uj(e['ann_mJ_per_token'])} | {ratio(e['snn_over_ann'])} |"
            )
    lines += ["", "Precision notes: " + "; ".join(f"{n}: {p['note']}" for n, p in summary["precisions"].items()), ""]
    reads = memory["reads_per_token"]
    count = lambda v: "-" if v is None else _count(v)  # noqa: E731
    lines += [
        f"**Weights read per token** (convention: {memory['convention']}):",
        "",
        "| part | SNN | ANN |",
        "|---|---|---|",
        *(f"| {part} | {count(r['snn'])} | {count(r['ann'])} |" for part, r in reads.items()),
        "",
    ]
    if spiking:
        lines += [
            f"The spiking model skips {memory['blocks']['skipped_fraction']:.2%} of the blocks' weight reads and "
            f"{memory['whole_model']['skipped_fraction']:.2%} of the whole model's.",
            "",
        ]
    lines += ["**Which figure is which**:", ""]
    lines += [f"- `{key}`: {text}" for key, text in summary["figures"].items()]
    lines += ["", f"**Not counted anywhere**: {summary['not_counted']}.", ""]
    return lines


def write_energy_report(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and the PNG plots into ``out_dir``; return the paths written.

    The firing-rate heat map and the sign histogram are drawn only for a spiking model.
    """
    out_dir = Path(out_dir)
    plots = []
    if summary["spiking"]:
        plot_firing_heatmap(summary, out_dir / HEATMAP)
        plot_spike_signs(summary, out_dir / SIGNS)
        plots += [HEATMAP, SIGNS]
    plot_energy_by_type(summary, out_dir / BY_TYPE)
    plots.append(BY_TYPE)
    write_text_atomic(out_dir / "report.md", markdown_report(summary, plots))
    return [out_dir / "report.md"] + [out_dir / p for p in plots]
