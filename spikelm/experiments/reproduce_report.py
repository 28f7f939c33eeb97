"""The report of ``spikelm reproduce``: the paper's table beside ours, the claims checked, plots.

Everything here is computed from the row files ``OUTPUT_DIR/rows/*.json`` and
``OUTPUT_DIR/data/summary.json`` (the majority-class baselines); nothing is typed in but the paper's
own numbers (SPEC section 5). Scores are the best dev epoch x 100, as the paper reports; a model's
average counts the MNLI-like task's matched and mismatched accuracy separately, as the paper's does.

A task column is *learned* by a model when its mean score exceeds the majority-class baseline by
more than two binomial standard errors of that baseline on the dev set; a task that no model learned
is at chance for every model: it is shown, marked, and left out of ``avg (learned)``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from spikelm.errors import UserError
from spikelm.outputs import write_json_atomic, write_text_atomic

REPORT_DIR = "report"
DOC_BEGIN, DOC_END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
PLOTS = ("finetune_curves.png", "firing_rate_per_layer.png", "pretrain_loss.png")

# SPEC section 5: GLUE dev, energy per 128-token sequence
PAPER_COLUMNS = ("MNLI m/mm", "QQP", "QNLI", "SST-2", "CoLA", "STS-B", "MRPC", "RTE")
PAPER_ROWS = {
    "ann": (
        "BERT-base (real-valued)",
        "-",
        51.41,
        ("83.8/83.4", "90.5", "90.7", "92.3", "60.0", "89.4", "89.8", "69.3"),
        83.2,
    ),
    "lif-bert": (
        "LIF-BERT ({0,1} spikes)",
        "4",
        7.98,
        ("56.8/55.2", "70.0", "60.6", "80.6", "14.6", "20.0", "82.3", "53.8"),
        54.9,
    ),
    "spikebert": ("SpikeBERT", "4", 14.30, ("71.4/71.0", "68.2", "66.4", "85.4", "16.9", "18.7", "82.0", "57.5"), 59.7),
    "spikelm-t1": ("SpikeLM", "1", 3.98, ("76.0/76.9", "84.0", "84.9", "86.5", "37.9", "84.3", "85.6", "65.3"), 75.7),
    "spikelm-t4": ("SpikeLM", "4", 13.9, ("77.1/77.2", "83.9", "85.3", "87.0", "38.8", "84.9", "85.7", "69.0"), 76.5),
}


# ----------------------------------------------------------------------------------------------
# Reading and aggregating the rows
# ----------------------------------------------------------------------------------------------


def load_rows(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]


def columns(tasks: list[str]) -> list[tuple[str, str, str]]:
    """``(task, metric key, header)`` per table column: two for an MNLI-like task (matched, mismatched)."""
    from spikelm.evaluation.glue.report import METRIC_NAMES, resolve_tasks
    from spikelm.evaluation.glue.tasks import TASKS

    out = []
    for t in resolve_tasks(",".join(tasks)):
        if t.layout == "mnli":
            out += [(t.name, "accuracy", f"{t.name} m (acc)"), (t.name, "accuracy_mismatched", f"{t.name} mm (acc)")]
        else:
            metric = TASKS[t.layout].metric if t.layout in TASKS else "accuracy"
            out.append((t.name, metric, f"{t.name} ({METRIC_NAMES[metric]})"))
    return out


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, None, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std, len(values)


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def fmt_energy(values: list[float]) -> str:
    """Three significant digits (a small model's energy is a fraction of a millijoule)."""
    mean, std, _ = mean_std(values)
    return f"{mean:.3g}" + (f" ± {std:.2g}" if std is not None else "")


def row_scores(row: dict, cols) -> list[float | None]:
    return [row["tasks"].get(task, {}).get("best", {}).get(metric) for task, metric, _ in cols]


def learned_columns(rows: list[dict], cols, majority: dict, order: list[str]) -> list[bool]:
    """Per column: did any model's mean score beat the majority baseline by more than 2 standard errors?"""
    learned = []
    for i, (task, metric, _) in enumerate(cols):
        base = majority[task]["metrics"][metric]
        split = "dev_mismatched" if metric.endswith("_mismatched") else next(iter(majority[task]["dev_examples"]))
        n = majority[task]["dev_examples"][split]
        margin = 2 * math.sqrt(base * (1 - base) / n)
        means = [mean_std([row_scores(r, cols)[i] for r in group])[0] for group in by_variant(rows, order).values()]
        learned.append(any(m > base + margin for m in means if not math.isnan(m)))
    return learned


def task_learned(cols, learned: list[bool]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for (task, _, _), ok in zip(cols, learned, strict=True):
        out[task] = out.get(task, False) or ok
    return out


def average(row: dict, cols, keep: dict[str, bool] | None = None) -> float | None:
    values = [v for (task, _, _), v in zip(cols, row_scores(row, cols), strict=True) if keep is None or keep[task]]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def by_variant(rows: list[dict], order: list[str]) -> dict[str, list[dict]]:
    """The rows of each variant, variants in ``order`` (names of ``reproduce.VARIANTS``)."""
    groups: dict[str, list[dict]] = {}
    for name in order:
        for row in rows:
            if row["variant"] == name:
                groups.setdefault(name, []).append(row)
    return groups


def energy_values(group: list[dict], key: str) -> list[float]:
    return [r["energy"][key] for r in group if r["energy"].get(key) is not None]


def summarize(out: Path, order: list[str]) -> dict:
    """The numbers behind the report (also written as ``report/summary.json``), variants in ``order``."""
    rows = load_rows(out)
    data = json.loads((out / "data" / "summary.json").read_text())
    if not rows:
        return {"rows": 0}
    budget = rows[0]["budget"]
    cols = columns(budget["tasks"])
    learned = learned_columns(rows, cols, data["majority"], order)
    keep = task_learned(cols, learned)
    variants = {}
    for name, group in by_variant(rows, order).items():
        first = group[0]
        variants[name] = {
            "label": first["label"],
            "ablation": first["ablation"],
            "model": first["model"],
            "seeds": [r["seed"] for r in group],
            "scores": {h: [row_scores(r, cols)[i] for r in group] for i, (_, _, h) in enumerate(cols)},
            "avg": [average(r, cols) for r in group],
            "avg_learned": [average(r, cols, keep) for r in group],
            "snn_mJ": energy_values(group, "snn_mJ_per_sequence"),
            "ann_mJ": energy_values(group, "ann_mJ_per_sequence"),
            "ratio": energy_values(group, "ratio"),
            "firing_rate": energy_values(group, "mean_firing_rate"),
            "pretrain_loss": [r["pretraining"]["final_validation"]["loss"] for r in group],
            "pretrain_accuracy": [r["pretraining"]["final_validation"]["accuracy"] for r in group],
            "nsp_accuracy": [r["pretraining"]["final_validation"].get("nsp_accuracy") for r in group],
            "unigram_loss": [r["pretraining"]["unigram_baseline_loss"] for r in group],
            "tokens": [r["pretraining"]["train_tokens"] for r in group],
            "tokens_per_second": [r["pretraining"]["tokens_per_second"] for r in group],
            "pretrain_minutes": [r["pretraining"]["train_seconds"] / 60 for r in group],
            "finetune_minutes": [
                sum(e["train_seconds"] + e["eval_seconds"] for t in r["tasks"].values() for e in t["curve"]) / 60
                for r in group
            ],
            "row_minutes": [r["row_seconds"] / 60 for r in group],
        }
    return {
        "rows": len(rows),
        "budget": budget,
        "columns": [h for _, _, h in cols],
        "majority": {h: data["majority"][t]["metrics"][m] for t, m, h in cols},
        "majority_labels": {t: data["majority"][t]["label"] for t in budget["tasks"]},
        "data_sizes": data["sizes"],
        "learned": dict(zip([h for _, _, h in cols], learned, strict=True)),
        "tasks_at_chance": [t for t, ok in keep.items() if not ok],
        "variants": variants,
        "claims": claims(variants),
    }


def _mean(values) -> float | None:
    mean, _, n = mean_std(values)
    return mean if n else None


def claims(variants: dict) -> dict:
    """The paper's claims, checked on the main rows' averages (learned tasks; all tasks if none is learned)."""
    main = {n: v for n, v in variants.items() if not v["ablation"]}
    key = "avg_learned" if any(_mean(v["avg_learned"]) is not None for v in main.values()) else "avg"
    avg = {n: _mean(v[key]) for n, v in main.items() if _mean(v[key]) is not None}
    result = {"average_used": key, "averages": avg, "ordering": sorted(avg, key=avg.get, reverse=True)}
    if all(n in avg for n in ("ann", "lif-bert", "spikelm-t4")) and avg["ann"] != avg["lif-bert"]:
        result["gap_closed_t4"] = (avg["spikelm-t4"] - avg["lif-bert"]) / (avg["ann"] - avg["lif-bert"])
    if all(n in avg for n in ("ann", "lif-bert", "spikelm-t1")) and avg["ann"] != avg["lif-bert"]:
        result["gap_closed_t1"] = (avg["spikelm-t1"] - avg["lif-bert"]) / (avg["ann"] - avg["lif-bert"])
    result["energy_ratio"] = {n: _mean(v["ratio"]) for n, v in variants.items() if v["ratio"]}
    result["paper_gap_closed_t4"] = (76.5 - 54.9) / (83.2 - 54.9)
    return result


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _t(model: dict) -> str:
    return str(model["num_steps"]) if model.get("spiking", True) else "-"


def markdown(summary: dict, image_prefix: str = "") -> str:
    if not summary.get("variants"):
        return "No row has finished yet.\n"
    s, b = summary, summary["budget"]
    cols = s["columns"]
    marked = [h + (" †" if not s["learned"][h] else "") for h in cols]
    lines = [
        f"Rows finished: {s['rows']}. Scores: best dev epoch x 100, mean ± standard deviation over seeds "
        "(no ± where one seed ran). † = no model beat the majority-class baseline by more than 2 standard "
        "errors on this column.",
        "",
    ]
    lines += [
        "| model | T | seeds | energy mJ | ratio vs ANN | "
        + " | ".join(marked)
        + " | avg | avg (learned) | firing rate |",
        "|---" * (len(cols) + 8) + "|",
    ]
    for name, v in s["variants"].items():
        mJ = v["snn_mJ"] or v["ann_mJ"]
        ratio = fmt(v["ratio"], 1.0, 2) if v["ratio"] else "1"
        lines.append(
            f"| {name} | {_t(v['model'])} | {len(v['seeds'])} | {fmt_energy(mJ)} | {ratio} | "
            + " | ".join(fmt(v["scores"][h]) for h in cols)
            + f" | {fmt(v['avg'])} | {fmt(v['avg_learned'])} | "
            + (fmt(v["firing_rate"], 1.0, 3) if v["firing_rate"] else "-")
            + " |"
        )
    base = [s["majority"][h] for h in cols]
    lines.append(
        "| majority class | | | | | "
        + " | ".join(f"{100 * x:.1f}" for x in base)
        + " | "
        + f"{100 * sum(base) / len(base):.1f} | | |"
    )
    c = s["claims"]
    order = " > ".join(f"{n} ({100 * c['averages'][n]:.1f})" for n in c["ordering"])
    lines += ["", f"**Ordering** by {c['average_used'].replace('_', ' ')} (mean over seeds): {order}."]
    if "gap_closed_t4" in c:
        lines.append(
            f"**Gap closed** between LIF-BERT and the ANN: SpikeLM T=4 {100 * c['gap_closed_t4']:.0f} %, "
            f"T=1 {100 * c.get('gap_closed_t1', math.nan):.0f} % (paper, T=4: "
            f"{100 * c['paper_gap_closed_t4']:.0f} %)."
        )
    ratios = ", ".join(f"{n} {r:.2f}x" for n, r in c["energy_ratio"].items())
    lines.append(
        f"**Energy ratio** ANN / SNN per {b['max_length']}-token sequence: {ratios} (paper: LIF-BERT 6.44x, "
        "SpikeLM T=1 12.9x, T=4 3.7x)."
    )
    if s["tasks_at_chance"]:
        lines.append(f"**At chance for every model:** {', '.join(s['tasks_at_chance'])} (left out of avg (learned)).")

    lines += [
        "",
        "The paper (SPEC section 5, GLUE dev; energy per 128-token sequence, BERT-base):",
        "",
        "| model | T | energy mJ | ratio vs ANN | " + " | ".join(PAPER_COLUMNS) + " | avg |",
        "|---" * (len(PAPER_COLUMNS) + 5) + "|",
    ]
    for label, steps, mJ, scores, avg in PAPER_ROWS.values():
        lines.append(f"| {label} | {steps} | {mJ} | {51.41 / mJ:.1f} | " + " | ".join(scores) + f" | {avg} |")

    lines += [
        "",
        "Side by side (ours: this budget; the paper: BERT-base, GLUE):",
        "",
        "| model | paper avg | ours avg (learned) | paper energy ratio | ours energy ratio | ours firing rate |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in s["variants"].items():
        if v["ablation"]:
            continue
        paper = PAPER_ROWS.get(name)
        ratio = fmt(v["ratio"], 1.0, 2) if v["ratio"] else "1"
        lines.append(
            f"| {name} | {paper[4] if paper else ''} | {fmt(v['avg_learned'])} | "
            f"{51.41 / paper[2]:.1f} | {ratio} | " + (fmt(v["firing_rate"], 1.0, 3) if v["firing_rate"] else "-") + " |"
        )

    lines += [
        "",
        "Pretraining (validation at the end; the unigram baseline is the loss of predicting the masked "
        "tokens from corpus frequencies) and time on this machine:",
        "",
        "| model | MLM loss | MLM acc | NSP acc | unigram loss | tokens | tokens/s | pretrain min | "
        "fine-tune min | row min |",
        "|---" * 10 + "|",
    ]
    for name, v in s["variants"].items():
        lines.append(
            f"| {name} | {fmt(v['pretrain_loss'], 1, 3)} | {fmt(v['pretrain_accuracy'])} | "
            f"{fmt(v['nsp_accuracy'])} | {fmt(v['unigram_loss'], 1, 3)} | {fmt(v['tokens'], 1, 0)} | "
            f"{fmt(v['tokens_per_second'], 1, 0)} | {fmt(v['pretrain_minutes'], 1, 1)} | "
            f"{fmt(v['finetune_minutes'], 1, 1)} | {fmt(v['row_minutes'], 1, 1)} |"
        )
    sizes = "; ".join(f"{t}: " + ", ".join(f"{k} {n}" for k, n in d.items()) for t, d in s["data_sizes"].items())
    labels = ", ".join(f"{t}: {lab}" for t, lab in s["majority_labels"].items())
    lines += [
        "",
        f"Budget: preset `{b['preset']}` {b['pretrain_overrides'] or ''}, {b['pretrain_steps']} pretraining "
        f"steps on corpus `{b['corpus']}`; fine-tuning {b['epochs']} epochs, lr {b['learning_rate']} (AdamW, "
        f"constant), batch {b['batch_size']}, max length {b['max_length']}; examples: {sizes}. Majority "
        f"labels: {labels}. Energy: {b['energy_sequences']} windows of {b['max_length']} tokens of the "
        "corpus's validation split through the pretrained encoder (0.9 pJ per AC, 4.6 pJ per MAC).",
        "",
    ]
    lines += [
        f"![fine-tuning curves]({image_prefix}finetune_curves.png)",
        "",
        f"![firing rate per layer]({image_prefix}firing_rate_per_layer.png)",
        "",
        f"![pretraining loss]({image_prefix}pretrain_loss.png)",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _style(name: str) -> dict:
    return {
        "ann": {"color": "black"},
        "lif-bert": {"color": "tab:red"},
        "spikelm-t1": {"color": "tab:green"},
        "spikelm-t4": {"color": "tab:blue"},
    }.get(name, {"linestyle": "--"})


def plot_curves(rows: list[dict], summary: dict, path: Path) -> None:
    """Dev score per epoch (mean over seeds, band: min to max), per task column, with the majority baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(summary["budget"]["tasks"])
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.4), squeeze=False)
    for ax, (task, metric, header) in zip(axes[0], cols, strict=True):
        for name, group in by_variant(rows, list(summary["variants"])).items():
            curves = np.array([[e[metric] for e in r["tasks"][task]["curve"]] for r in group], dtype=float) * 100
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, curves.mean(0), label=name, **_style(name))
            if len(group) > 1:
                ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15, color=_style(name).get("color"))
        ax.axhline(100 * summary["majority"][header], color="grey", linestyle=":", label="majority class")
        ax.set_title(header, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("dev score x 100")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# the neurons of one block in the order the forward pass meets them
_BLOCK_ORDER = ("qkv", "key_spike", "value_spike", "attention.output", "intermediate", "output.dense")


def _forward_order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    layer = int(parts[parts.index("layer") + 1]) if "layer" in parts else -1
    return layer, next((i for i, key in enumerate(_BLOCK_ORDER) if key in name), len(_BLOCK_ORDER))


def _short(name: str) -> str:
    for prefix in ("bert.encoder.layer.", "encoder.layer."):
        name = name.replace(prefix, "L")
    return name.replace("attention.self.", "").replace("attention.output.", "attn_out.").replace(".neuron", "")


def plot_firing_rates(rows: list[dict], order: list[str], path: Path) -> None:
    """Firing rate of every neuron (mean over steps and seeds) of the pretrained encoders, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    names = None
    for name, group in by_variant(rows, order).items():
        if not group[0]["energy"]["neurons"]:
            continue
        names = sorted(group[0]["energy"]["neurons"], key=_forward_order)
        rates = np.array([[np.mean(r["energy"]["neurons"][n]["firing_rate"]) for n in names] for r in group])
        ax.plot(range(len(names)), rates.mean(0), marker="o", markersize=3, label=name, **_style(name))
    if names:
        ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=70, fontsize=7)
        ax.legend(fontsize=7)
    ax.set_ylabel("firing rate (nonzero spikes / slots)")
    ax.set_title("Firing rate per neuron (input of each spiking layer), pretrained encoder, corpus windows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pretraining(rows: list[dict], order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, group in by_variant(rows, order).items():
        steps = [e["step"] for e in group[0]["pretrain_log"]]
        losses = np.array([[e["loss"] for e in r["pretrain_log"]] for r in group]).mean(0)
        ax.plot(steps, losses, label=name, **_style(name))
    ax.axhline(rows[0]["pretraining"]["unigram_baseline_loss"], color="grey", linestyle=":", label="unigram (MLM part)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MLM + NSP)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Writing it
# ----------------------------------------------------------------------------------------------


def doc_markers(block: str | None = None) -> tuple[str, str]:
    """The markers of a generated block: ``<!-- reproduce:begin -->``, or ``<!-- reproduce-NAME:begin -->``
    for the block named NAME (several runs in one document)."""
    if block is None:
        return DOC_BEGIN, DOC_END
    if not re.fullmatch(r"[A-Za-z0-9_-]+", block):
        raise UserError(f"--doc-block expects letters, digits, '-' or '_', got {block!r}")
    return f"<!-- reproduce-{block}:begin -->", f"<!-- reproduce-{block}:end -->"


def check_doc(doc: str | Path, block: str | None = None) -> str:
    """The text of ``doc``, which must hold the generated block's markers (checked before any run starts)."""
    begin, end = doc_markers(block)
    if not Path(doc).is_file():
        raise UserError(f"--doc {doc}: no such file (create it with a '{begin}' ... '{end}' block)")
    content = Path(doc).read_text()
    if begin not in content or end not in content:
        raise UserError(f"--doc {doc} has no '{begin}' ... '{end}' block to fill in")
    return content


def update_doc(doc: Path, text: str, block: str | None = None) -> None:
    """Replace the generated block of ``doc`` (between the markers) with ``text``."""
    begin, end = doc_markers(block)
    content = check_doc(doc, block)
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(doc, head + begin + "\n" + text + "\n" + end + tail)


def write_report(out: Path, order: list[str], doc: str | Path | None = None, block: str | None = None) -> dict:
    """``report/summary.json``, ``report/results.md`` and the plots (``order``: the variant names to report, in
    that order); with ``doc``, its generated block
    (``block``: a named one) and the plots under ``<doc dir>/reproduction/`` (``reproduction/<block>/``)."""
    report = out / REPORT_DIR
    report.mkdir(exist_ok=True)
    summary = summarize(out, order)
    write_json_atomic(report / "summary.json", summary)
    write_text_atomic(report / "results.md", markdown(summary))
    if summary.get("variants"):
        rows = load_rows(out)
        plot_curves(rows, summary, report / PLOTS[0])
        plot_firing_rates(rows, order, report / PLOTS[1])
        plot_pretraining(rows, order, report / PLOTS[2])
    if doc is not None:
        doc = Path(doc)
        check_doc(doc, block)  # a bad file or block fails before anything is copied
        prefix = "reproduction/" if block is None else f"reproduction/{block}/"
        images = doc.parent / prefix
        images.mkdir(parents=True, exist_ok=True)
        for name in PLOTS:
            if (report / name).is_file():
                shutil.copyfile(report / name, images / name)
        update_doc(doc, markdown(summary, image_prefix=prefix), block)
    return summary
