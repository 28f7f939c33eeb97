"""The demo's summary: ``report.md`` (every figure of ``figures.json``, the continuations, links to the plots) and
``summary.png`` (accuracy, perplexity and energy side by side)."""

from __future__ import annotations

from pathlib import Path

from spikelm.outputs import write_text_atomic

SUMMARY_PLOT = "summary.png"


def _neuron_name(recipe: dict) -> str:
    """The recipe's neuron in prose (its plug-in's ``display_name``, e.g. GIF, signed); empty if none is named."""
    from spikelm.nn.neurons import neuron_class, neuron_names

    name = recipe.get("neuron")
    if name not in neuron_names():
        return str(name or "")
    cls = neuron_class(name)
    return cls.display_name or cls.name


def summary_panels(figures: dict) -> list[dict]:
    """The summary plot's bar charts, one per part that ran: ``title``, ``labels``, ``values``, ``fmt`` and a
    ``note`` printed beside the last bar (the LLM's energy panel: its perplexity ratio, so the two are read
    together)."""
    panels = []
    if "classifier" in figures:
        c = figures["classifier"]
        panels.append(
            {
                "title": f"{c['task']} test accuracy",
                "labels": ["majority\nclass", "real-valued\nteacher", f"spiking\nT={c['student']['num_steps']}"],
                "values": [
                    c["majority_class"]["test_accuracy"],
                    c["teacher"]["test_accuracy"],
                    c["student"]["test_accuracy"],
                ],
                "fmt": "{:.3f}",
            }
        )
    if "llm" in figures:
        p = figures["llm"]["perplexity"]
        neuron = _neuron_name(figures["llm"].get("recipe", {}))  # the recipe's neuron, by its plug-in
        panels.append(
            {
                "title": f"{figures['llm']['source']} perplexity",
                "labels": ["real-valued", f"spiking\n{neuron} T={figures['llm']['time_steps']}".replace("\n ", "\n")],
                "values": [p["real"], p["spiking"]],
                "fmt": "{:.1f}",
            }
        )
    for name, e in figures.get("energy", {}).items():
        unit = "sentence" if name == "classifier" else f"{figures['settings']['window']}-token window"
        panel = {
            "title": f"{name}: mJ per {unit}",
            "labels": ["real-valued", "spiking"],
            "values": [e["ann_mJ_per_sequence"], e["snn_mJ_per_sequence"]],
            "fmt": "{:.3g}",
        }
        if name == "llm" and "llm" in figures:
            ratio = figures["llm"]["perplexity"]["ratio"]
            panel["title"] = f"LLM energy: mJ per {unit}\n(compute, blocks, 32-bit float)"
            panel["note"] = (
                f"energy {e['snn_mJ_per_sequence'] / e['ann_mJ_per_sequence']:.2f}x\nperplexity {ratio:.2f}x"
            )
        panels.append(panel)
    return panels


def _describe(recipe: dict) -> str:
    """The recipe's neuron and settings in a sentence, by its plug-in (the model card's words)."""
    from spikelm.nn.neurons import neuron_class, neuron_names

    name = recipe.get("neuron")
    return neuron_class(name).describe(recipe) if name in neuron_names() else f"neuron {name}"


def plot_summary(figures: dict, path: Path) -> bool:
    """One row of bar charts for the parts that ran; False (nothing written) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = summary_panels(figures)
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        values = panel["values"]
        bars = ax.bar(panel["labels"], values, color=["#999999", "#4477aa", "#ee6677"][-len(values) :])
        ax.bar_label(bars, [panel["fmt"].format(v) for v in values])
        ax.set_title(panel["title"], fontsize=10)
        ax.margins(y=0.15)
        if "note" in panel:  # beside the last (spiking) bar, in axis coordinates so it stays inside the panel
            ax.set_xlim(-0.6, len(values) - 0.4 + 0.9)
            last = bars[-1]
            ax.annotate(
                panel["note"],
                (last.get_x() + last.get_width(), last.get_height() / 2),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                fontsize=9,
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(figures: dict, plot: str | None) -> str:
    s = figures["settings"]
    lines = ["# spikelm demo", ""]
    secs = figures["seconds"]
    lines += [
        f"Parts run: {', '.join(p for p in ('classifier', 'llm', 'energy') if p in secs)}; "
        f"{secs['total'] / 60:.1f} min in all ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items() if k != "total")
        + f"); peak RSS {figures['peak_rss_mb'] / 1024:.2f} GB. Every figure is in `figures.json`.",
        "",
    ]
    if figures.get("earlier"):
        lines += [
            f"Figures of {', '.join(figures['earlier'])} from an earlier run into this directory are kept in "
            "`figures.json` under `earlier` (not shown here).",
            "",
        ]
    if plot:
        lines += [f"![summary]({plot})", ""]
    if "classifier" in figures:
        c = figures["classifier"]
        t, st, m = c["teacher"], c["student"], c["majority_class"]
        lines += [
            "## A spiking classifier from a pretrained encoder",
            "",
            f"MiniLM-L6 (`{c['source']}`) fine-tuned on `{c['task']}` (positive vs negative review sentences, the "
            f"offline suite's SST-2 analogue) on {c['train_examples']:,} training sentences, lr {s['finetune_lr']}, "
            f"batch {s['batch_size']} (batches of similar lengths, each padded to its longest), up to "
            f"{s['max_length']} tokens. The epoch is picked on "
            f"{c['dev_examples_for_selection']:,} dev sentences; accuracy is on the {c['test_examples']:,} held-out "
            f"test sentences (labels `{c['test_labels']}`).",
            "",
            "| model | epochs (best on dev) | dev accuracy | **test accuracy** | minutes |",
            "|---|---|---|---|---|",
            f"| majority class of the training split (label {m['label']}) | - | - | {m['test_accuracy']:.4f} | - |",
            f"| real-valued MiniLM (teacher) | {t['epochs']} ({t['best_epoch']}) | {t['dev_accuracy']:.4f} | "
            f"**{t['test_accuracy']:.4f}** | {t['seconds'] / 60:.1f} |",
            f"| SpikeLM (ternary spikes, T={st['num_steps']}) from "
            f"{'the teacher' if c.get('student_from') == 'teacher' else 'MiniLM'}'s weights, distilling the teacher "
            f"(kd weight {s['kd_weight']}) | {st['epochs']} ({st['best_epoch']}) | {st['dev_accuracy']:.4f} | "
            f"**{st['test_accuracy']:.4f}** | {st['seconds'] / 60:.1f} |",
            "",
            f"The spiking classifier is {c['gap_points']:.2f} points behind its real-valued teacher. Models and "
            f"predictions: `{t['model_dir']}/`, `{st['model_dir']}/` (`{st['test_predictions']}`).",
            "",
        ]
    if "llm" in figures:
        g = figures["llm"]
        p = g["perplexity"]
        recipe = ", ".join(f"{k}={v}" for k, v in g["recipe"].items())
        lines += [
            "## A spiking LLM from a pretrained LLM",
            "",
            f"{g['source']} ({g['parameters'] / 1e6:.1f} M parameters) converted without training by "
            f"`spikelm.spikify` with the default recipe ({recipe}; T={g['time_steps']}; {_describe(g['recipe'])}), "
            "calibrated on "
            f"{g['calibration']} ({g['conversion_seconds']:.0f} s). Perplexity on {g['evaluation']}, disjoint "
            f"windows of {g['window']} ({p['tokens_scored']:,} tokens scored):",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| real-valued | {p['real']:.2f} |",
            f"| spiking | {p['spiking']:.2f} |",
            f"| ratio | **{p['ratio']:.2f}** |",
            "",
            "Greedy continuations (KV cache, one prompt at a time, float32 on the CPU):",
            "",
        ]
        for gen in g["generations"]:
            lines.append(f"**{gen['prompt']}**")
            lines.append("")
            for kind in ("real", "spiking"):
                r = gen[kind]
                text = r["continuation"].replace("\n", " ")
                lines.append(f"- {kind} ({r['tokens_per_second']:.1f} tokens/s): ...{text}")
            lines.append("")
    if "energy" in figures:
        lines += [
            "## Energy and firing rates",
            "",
            "E = 0.9 pJ x ACs + 4.6 pJ x MACs (45 nm, 32-bit float) over the matrix products inside the "
            "Transformer blocks, per sequence, summed over the time steps; the real-valued figure is the same "
            "products once with real-valued inputs (`spikelm.evaluation.energy`). Each model's full report "
            "(per layer, per step) and plots are linked.",
            "",
            "| model | input | spiking mJ / sequence | real-valued mJ / sequence | ratio | mean firing rate | report |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, e in figures["energy"].items():
            what = (
                f"{e['sequences']} test sentences ({e['mean_tokens']} tokens on average)"
                if name == "classifier"
                else f"{e['sequences']} windows of {s['window']} tokens of the perplexity text"
            )
            folder = str(Path(e["energy_json"]).parent)
            lines.append(
                f"| {name} | {what} | {e['snn_mJ_per_sequence']:.4g} | {e['ann_mJ_per_sequence']:.4g} | "
                f"{e['ratio']:.2f}x | {e['mean_firing_rate']:.3f} | [{folder}/report.md]({folder}/report.md) |"
            )
        lines.append("")
        same = {name: e["snn_over_ann"] for name, e in figures["energy"].items() if "snn_over_ann" in e}
        if same:
            lines += [
                "Spiking / real-valued energy per token with both models at the same weight precision (Horowitz's "
                "45 nm add and multiply-add for each); *memory-inclusive* adds every weight read (DRAM, "
                "docs/CONVERSION.md, Energy), a spiking layer skipping the rows of channels that fire nothing:",
                "",
                "| model | precision | blocks | whole model | whole model, memory-inclusive |",
                "|---|---|---|---|---|",
            ]
            for name, ratios in same.items():
                for precision, r in ratios.items():
                    lines.append(
                        f"| {name} | {precision} | {r['blocks']:.3f} | {r['whole_model']:.3f} | "
                        f"{r['whole_model_with_memory']:.3f} |"
                    )
            lines.append("")
        if figures["energy"].get("llm", {}).get("ratio", 1) < 1:
            lines += [
                "The converted LLM costs more than its source under this accounting: a spike of level k is k "
                "accumulates, so an input channel that fires several levels on average costs more than the one "
                "multiply-add it replaces (docs/CONVERSION.md, Energy). The native SpikeLM classifier's ternary "
                "spikes are one accumulate each.",
                "",
            ]
        for name, e in figures["energy"].items():
            for p in (p for p in e.get("plots", []) if p.endswith(".png")):
                lines.append(f"![{name}: {Path(p).stem}]({p})")
        lines.append("")
    lines += [
        "## Settings",
        "",
        "```",
        *(f"{k} = {v}" for k, v in s.items()),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_report(figures: dict, out: Path) -> None:
    plot = SUMMARY_PLOT if plot_summary(figures, out / SUMMARY_PLOT) else None
    write_text_atomic(out / "report.md", markdown(figures, plot))
