"""The demo (``spikelm demo``): spiking language models made from pretrained ones, measured on real text.

Three parts, each optional (:data:`PARTS`):

``classifier``
    MiniLM-L6 (the ``minilm`` source) fine-tuned on the offline ``multiemo-sst2`` sentiment task twice with one
    recipe: the real-valued model (the teacher), then SpikeLM (ternary spikes, T = 4) from the same weights with the
    teacher's logits distilled into it (``finetune(..., teacher=...)``). Each picks its epoch on (a subset of) the
    dev split; both are scored on the task's held-out test labels (the test file carries no labels; they are read
    from ``test_labels.tsv`` beside it), beside the majority class of the training split.
``llm``
    SmolLM2-135M (``smollm2-135m``) made to spike by :func:`spikelm.conversion.spikify` with the default recipe
    (:data:`spikelm.conversion.recipes.DEFAULT_RECIPE`, described by its neuron plug-in), calibrated on a few
    sequences; perplexity of the real-valued and the spiking model on the same tokens, and both models' greedy
    continuations of fixed prompts with tokens/s.
``energy``
    :func:`spikelm.evaluation.energy.measure_energy` of the spiking models made by the other parts, against their
    real-valued sources, with the energy report and plots of :mod:`spikelm.evaluation.energy_report` (the LLM's:
    the model the ``llm`` part converted with the default recipe, its perplexity ratio printed beside its energy).

Everything goes under one output directory; ``figures.json`` holds every figure and ``report.md`` shows them
(:mod:`spikelm.experiments.demo_report`).
"""

from __future__ import annotations

import csv
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spikelm.errors import UserError

PARTS = ("classifier", "llm", "energy")
TASK = "multiemo-sst2"
PROMPTS = (
    "The history of the city begins",
    "Scientists have discovered that",
    "The best way to learn a new language is",
)


@dataclass
class DemoSettings:
    parts: tuple[str, ...] = PARTS
    # classifier
    classifier_source: str = "minilm"
    finetune_samples: int = 2000  # training examples (a fixed random subset)
    finetune_epochs: int = 2  # the spiking student's epochs (best on dev kept)
    teacher_epochs: int = 2
    finetune_lr: float = 5e-5
    kd_weight: float = 0.5
    student_from: str = "teacher"  # "teacher": the fine-tuned teacher's weights made to spike; "source": MiniLM's
    max_length: int = 64
    batch_size: int = 32
    dev_examples: int | None = 1000  # dev subset used to pick the epoch; None: all
    seed: int = 42
    # llm
    llm_source: str = "smollm2-135m"
    text_file: str | None = None  # calibration + perplexity text (default: pypi corpus + Brown)
    eval_tokens: int = 4096
    calibration_sequences: int = 8
    window: int = 512  # calibration sequence length and perplexity window
    prompts: tuple[str, ...] = PROMPTS
    new_tokens: int = 32
    # energy
    energy_sequences: int = 64  # test sentences for the classifier
    energy_tokens: int = 2048  # perplexity tokens for the LLM (in windows of ``window``)
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise UserError(f"--parts must be a comma-separated list of {', '.join(PARTS)}; got {','.join(self.parts)}")
        if self.parts == ("energy",):
            raise UserError(
                "--parts energy measures the spiking models the classifier and llm parts make in the same run; "
                "add one of them (e.g. --parts classifier,energy)"
            )
        if self.student_from not in ("teacher", "source"):
            raise UserError(f"student_from must be 'teacher' or 'source', got {self.student_from!r}")
        for name in ("finetune_samples", "finetune_epochs", "teacher_epochs", "eval_tokens", "calibration_sequences"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.finetune_lr > 0 and math.isfinite(self.finetune_lr)):
            raise UserError(f"--finetune-lr must be a positive number, got {self.finetune_lr}")
        if self.eval_tokens < 2 * self.window and "llm" in self.parts:
            raise UserError(f"--eval-tokens must be at least {2 * self.window} (two windows), got {self.eval_tokens}")

    def text_tokens_needed(self) -> int:
        """Tokens ``--text-file`` must hold: the perplexity slice, then the calibration sequences after it."""
        return self.eval_tokens + self.calibration_sequences * self.window


def check_text_file_size(settings: DemoSettings) -> None:
    """Refuse a ``--text-file`` that cannot hold the tokens the llm part needs, without a tokenizer: every token of
    a byte-level BPE covers at least one byte, so a file of fewer bytes than tokens needed is too short for any."""
    if settings.text_file is None or "llm" not in settings.parts:
        return
    size = Path(settings.text_file).stat().st_size
    need = settings.text_tokens_needed()
    if size < need:
        raise UserError(
            f"--text-file {settings.text_file} is {size:,} bytes; the llm part needs {need:,} tokens of it "
            f"({settings.eval_tokens:,} for perplexity, then {settings.calibration_sequences} x {settings.window} "
            "to calibrate): give a longer text (about 4 bytes a token for English)"
        )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# classifier
# ----------------------------------------------------------------------------------------------


def read_labels(path: Path) -> dict[str, str]:
    """``index -> label`` of a two-column TSV with a header (``test_labels.tsv``, ``predictions/*.tsv``)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {r[0]: r[1] for r in rows[1:]}


def labelled_accuracy(predictions: Path, labels: Path) -> float:
    """Accuracy of a prediction file against the labels file, matched by index (every labelled example must have
    a prediction)."""
    truth, guess = read_labels(labels), read_labels(predictions)
    missing = set(truth) - set(guess)
    if missing:
        raise ValueError(f"{predictions} has no prediction for {len(missing)} of the {len(truth)} test examples")
    return sum(guess[i] == y for i, y in truth.items()) / len(truth)


def run_classifier(settings: DemoSettings, out: Path, log) -> dict:
    from spikelm.evaluation.glue.offline import prepare_offline_suite
    from spikelm.training.finetune import Settings, finetune

    suite = prepare_offline_suite([TASK], out / "data")[TASK]["splits"]
    data_dir = out / "data" / TASK
    train_counts = suite["train"]["labels"]
    majority = max(train_counts, key=train_counts.get)
    labels_path = data_dir / "test_labels.tsv"
    test_labels = read_labels(labels_path)
    log(
        f"{TASK}: {suite['train']['examples']:,} training / {suite['dev']['examples']:,} dev / "
        f"{suite['test']['examples']:,} test sentences (positive vs negative reviews); training on "
        f"{min(settings.finetune_samples, suite['train']['examples']):,}, picking the epoch on "
        f"{min(settings.dev_examples or 10**9, suite['dev']['examples']):,} dev sentences"
    )
    figures = {
        "task": TASK,
        "source": settings.classifier_source,
        "train_examples": min(settings.finetune_samples, suite["train"]["examples"]),
        "dev_examples_for_selection": min(settings.dev_examples or 10**9, suite["dev"]["examples"]),
        "test_examples": len(test_labels),
        "test_labels": str(labels_path.relative_to(out)),
        "majority_class": {
            "label": majority,
            "test_accuracy": sum(y == majority for y in test_labels.values()) / len(test_labels),
        },
    }

    def one(name: str, start: str, epochs: int, changes: dict, teacher: str | None) -> dict:
        started = time.perf_counter()
        run_dir = out / "classifier" / name
        result = finetune(
            start,
            "sst2",
            str(run_dir),
            data_dir=str(data_dir),
            settings=Settings(
                learning_rate=settings.finetune_lr,
                batch_size=settings.batch_size,
                epochs=epochs,
                max_length=settings.max_length,
                seed=settings.seed,
                max_train_samples=settings.finetune_samples,
                max_eval_samples=settings.dev_examples,
                padding="longest",
                group_by_length=True,
                kd_weight=settings.kd_weight if teacher else 0.5,
            ),
            changes=changes,
            overwrite=True,
            log=log,
            teacher=teacher,
        )
        predictions = run_dir / "predictions" / "SST-2.tsv"
        config = result["settings"]
        return {
            "model_dir": str(run_dir.relative_to(out)),
            "initialised_from": config["initialised_from"],
            "spiking": config["spiking"],
            "num_steps": config["num_steps"] if config["spiking"] else None,
            "spike_levels": config["spike_levels"],
            "teacher": "teacher" if teacher else None,
            "epochs": epochs,
            "best_epoch": result["best"]["epoch"],
            "dev_accuracy": result["best"]["accuracy"],
            "test_predictions": str(predictions.relative_to(out)),
            "test_accuracy": labelled_accuracy(predictions, labels_path),
            "seconds": round(time.perf_counter() - started, 1),
        }

    log("-- the real-valued MiniLM (the teacher)")
    figures["teacher"] = one("teacher", settings.classifier_source, settings.teacher_epochs, {"spiking": False}, None)
    log(
        f"real-valued teacher: test accuracy {figures['teacher']['test_accuracy']:.4f} (dev "
        f"{figures['teacher']['dev_accuracy']:.4f}, epoch {figures['teacher']['best_epoch']})"
    )
    teacher_dir = str(out / "classifier" / "teacher")
    if settings.student_from == "teacher":
        log("-- the teacher made to spike (SpikeLM: ternary spikes, T=4), fine-tuned distilling the teacher's logits")
        figures["student"] = one("student", teacher_dir, settings.finetune_epochs, {"spiking": True}, teacher_dir)
    else:
        log("-- SpikeLM from MiniLM's weights (ternary spikes, T=4), fine-tuned distilling the teacher's logits")
        figures["student"] = one("student", settings.classifier_source, settings.finetune_epochs, {}, teacher_dir)
    figures["student_from"] = settings.student_from
    figures["gap_points"] = round(100 * (figures["teacher"]["test_accuracy"] - figures["student"]["test_accuracy"]), 2)
    return figures


def classifier_summary_lines(figures: dict) -> list[str]:
    t, s, m = figures["teacher"], figures["student"], figures["majority_class"]
    return [
        f"{TASK} test accuracy ({figures['test_examples']:,} held-out sentences): real-valued teacher "
        f"{t['test_accuracy']:.4f}, spiking SpikeLM (ternary, T={s['num_steps']}) {s['test_accuracy']:.4f} "
        f"({figures['gap_points']:+.2f} points behind), majority class {m['test_accuracy']:.4f}",
    ]


# ----------------------------------------------------------------------------------------------
# llm
# ----------------------------------------------------------------------------------------------


def llm_text(settings: DemoSettings, tokenizer):
    """(perplexity tokens (1-D), calibration batches, descriptions): from ``--text-file`` (its first
    ``eval_tokens`` tokens, then the calibration sequences after them) or by default the first ``eval_tokens`` of the
    Brown text and calibration sequences of the default ``pypi`` corpus."""
    import torch

    from spikelm.conversion.recipes import calibration_batches

    if settings.text_file is not None:
        text = Path(settings.text_file).read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        need = settings.text_tokens_needed()
        if len(ids) < need:
            raise UserError(
                f"--text-file {settings.text_file} is {len(ids):,} tokens with this tokenizer; the llm part needs "
                f"{need:,} ({settings.eval_tokens:,} for perplexity, then {settings.calibration_sequences} x "
                f"{settings.window} to calibrate): give a longer text"
            )
        name = Path(settings.text_file).name
        tokens = torch.tensor(ids[: settings.eval_tokens], dtype=torch.long)
        cal = torch.tensor(ids[settings.eval_tokens : need], dtype=torch.long).view(-1, settings.window)
        return (
            tokens,
            list(cal.split(4)),
            f"the first {settings.eval_tokens:,} tokens of {name}",
            f"{settings.calibration_sequences} sequences x {settings.window} tokens of {name}, after the "
            "perplexity tokens",
        )
    from spikelm.evaluation.brown_perplexity import brown_eval_tokens

    tokens = brown_eval_tokens(tokenizer, settings.eval_tokens)
    batches, calibration = calibration_batches(tokenizer, None, settings.calibration_sequences, settings.window)
    return (
        tokens,
        batches,
        f"the first {settings.eval_tokens:,} tokens of the Brown text (press reportage; "
        "spikelm.evaluation.brown_perplexity)",
        calibration,
    )


def greedy(model, tokenizer, prompts, new_tokens: int) -> list[dict]:
    """Greedy continuation of each prompt alone (no padding), with the KV cache; tokens/s per prompt."""
    import torch

    rows = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        options = {"eos_token_id": tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **options,
            )
        seconds = time.perf_counter() - started
        new = output[0, ids.shape[1] :].tolist()
        rows.append(
            {
                "prompt": prompt,
                "continuation": tokenizer.decode(new, skip_special_tokens=True),
                "new_tokens": len(new),
                "seconds": round(seconds, 3),
                "tokens_per_second": round(len(new) / seconds, 2),
            }
        )
    return rows


def run_llm(settings: DemoSettings, out: Path, log, context: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikelm.conversion import SpikeLMConversionConfig, spikify
    from spikelm.conversion.recipes import DEFAULT_RECIPE, RECIPES
    from spikelm.data.pretrained import resolve_model_source
    from spikelm.evaluation.brown_perplexity import perplexity
    from spikelm.nn.neurons import neuron_class

    source = resolve_model_source(settings.llm_source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens, calibration, evaluation, calibration_text = llm_text(settings, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{settings.llm_source}: {parameters / 1e6:.0f} M parameters; perplexity on {evaluation}")
    figures: dict = {
        "source": settings.llm_source,
        "parameters": parameters,
        "evaluation": evaluation,
        "eval_tokens": int(tokens.numel()),
        "window": settings.window,
        "calibration": calibration_text,
    }
    started = time.perf_counter()
    real = perplexity(model, tokens, window=settings.window, stride=settings.window, progress=True)
    log(f"real-valued perplexity {real['perplexity']:.2f} ({real['seconds']:.0f} s)")
    real_text = greedy(model, tokenizer, settings.prompts, settings.new_tokens)
    context["llm_energy_tokens"] = tokens[: max(settings.window, settings.energy_tokens)]
    fields = dict(RECIPES[DEFAULT_RECIPE])
    config = SpikeLMConversionConfig(**fields)
    log(f"converting with the default recipe ({recipe_summary(fields)}), calibrating on {calibration_text}")
    converted = time.perf_counter()
    spikify(model, config, calibration=calibration)
    convert_seconds = time.perf_counter() - converted
    spiking = perplexity(model, tokens, window=settings.window, stride=settings.window, progress=True)
    log(f"spiking perplexity {spiking['perplexity']:.2f} ({spiking['seconds']:.0f} s)")
    spiking_text = greedy(model, tokenizer, settings.prompts, settings.new_tokens)
    applied = model.config.quantization_config.to_dict()  # as applied (a rotation the model cannot fold is dropped)
    figures.update(
        recipe={k: v for k, v in applied.items() if k in fields},
        time_steps=neuron_class(config.neuron).time_steps(applied),
        conversion_seconds=round(convert_seconds, 1),
        perplexity={
            "real": real["perplexity"],
            "spiking": spiking["perplexity"],
            "ratio": spiking["perplexity"] / real["perplexity"],
            "tokens_scored": spiking["tokens_scored"],
        },
        generations=[
            {"prompt": r["prompt"], "real": r, "spiking": s} for r, s in zip(real_text, spiking_text, strict=True)
        ],
        seconds=round(time.perf_counter() - started, 1),
    )
    context["llm_model"] = model
    return figures


def recipe_summary(recipe: dict) -> str:
    """The recipe in a few words, from its neuron plug-in (:meth:`~spikelm.nn.neurons.base.SpikingNeuron.summary`),
    with the rotations it asks for (the value/output one only where asked)."""
    from spikelm.nn.neurons import neuron_class

    words = neuron_class(recipe["neuron"]).summary(recipe)
    rotations = [
        what
        for what, on in (
            ("residual-stream rotation", recipe.get("rotation", "none") != "none"),
            ("online FFN rotation", recipe.get("online_down_proj_rotation", False)),
            ("value/output rotation", recipe.get("value_rotation", False)),
        )
        if on
    ]
    return f"{words}; {', '.join(rotations)}" if rotations else words


def llm_summary_lines(figures: dict) -> list[str]:
    p = figures["perplexity"]
    lines = [
        f"{figures['source']} perplexity on {figures['evaluation']}: real-valued {p['real']:.2f}, spiking "
        f"({recipe_summary(figures['recipe'])}) {p['spiking']:.2f} (ratio {p['ratio']:.2f})",
    ]
    for g in figures["generations"]:
        lines.append(f'  "{g["prompt"]}"')
        for kind in ("real", "spiking"):
            r = g[kind]
            lines.append(f"    {kind:<8} ({r['tokens_per_second']:.1f} tokens/s): ...{r['continuation']!r}")
    return lines


# ----------------------------------------------------------------------------------------------
# energy
# ----------------------------------------------------------------------------------------------


def llm_energy(model, tokens, window: int, progress=None) -> dict:
    """:func:`~spikelm.evaluation.energy.measure_energy` of a causal LM (converted or not) on disjoint windows of
    ``tokens``, one window a sequence."""
    from spikelm.evaluation.energy import measure_energy

    count = tokens.numel() // window
    windows = tokens[: count * window].view(count, window)
    return measure_energy(model, [{"input_ids": windows[i : i + 1]} for i in range(count)], progress=progress)


def _save_energy(summary: dict, out: Path, part: str) -> dict:
    """Write one part's energy.json and plots under ``out/energy/<part>``; the figures the report keeps."""
    from spikelm.evaluation.energy_report import write_energy_report
    from spikelm.outputs import write_json_atomic

    folder = out / "energy" / part
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "energy.json", summary)
    plots = [p for p in write_energy_report(summary, folder) if Path(p).suffix == ".png"]
    return {
        **{key: summary[key] for key in ("snn_mJ_per_sequence", "ann_mJ_per_sequence", "ratio", "mean_firing_rate")},
        "snn_over_ann": {  # both models at the same precision, per token: compute, and with every weight read
            name: {scope: p[scope]["snn_over_ann"] for scope in ("blocks", "whole_model", "whole_model_with_memory")}
            for name, p in summary["precisions"].items()
        },
        "energy_json": str((folder / "energy.json").relative_to(out)),
        "plots": [str(Path(p).relative_to(out)) for p in plots],
    }


def run_energy(settings: DemoSettings, out: Path, log, context: dict, figures: dict) -> dict:
    from tqdm.auto import tqdm

    from spikelm.evaluation.energy import measure_energy
    from spikelm.evaluation.energy_report import padded_batches

    result = {}
    if "classifier" in figures:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        import spikelm.models  # noqa: F401  (registers the spikelm model type)

        student_dir = out / figures["classifier"]["student"]["model_dir"]
        model = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        with open(out / "data" / TASK / "test.tsv", newline="") as f:
            sentences = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
        sentences = sentences[: settings.energy_sequences]
        features = [
            {"input_ids": tokenizer(s, truncation=True, max_length=settings.max_length).input_ids} for s in sentences
        ]
        summary = measure_energy(
            model,
            list(padded_batches(features, tokenizer, 16)),
            progress=lambda b: tqdm(b, desc="energy (classifier)", leave=False, disable=None),
        )
        result["classifier"] = {
            "sequences": len(sentences),
            "mean_tokens": round(sum(len(f["input_ids"]) for f in features) / len(features), 1),
            **_save_energy(summary, out, "classifier"),
        }
        log(
            f"classifier energy per test sentence ({result['classifier']['mean_tokens']} tokens on average): "
            f"spiking {summary['snn_mJ_per_sequence']:.4f} mJ vs real-valued {summary['ann_mJ_per_sequence']:.4f} mJ "
            f"(ratio {summary['ratio']:.2f}x); mean firing rate {summary['mean_firing_rate']:.3f}"
        )
    if "llm" in figures:
        spiking = llm_energy(
            context["llm_model"],
            context["llm_energy_tokens"],
            settings.window,
            progress=lambda b: tqdm(b, desc="energy (LLM)", leave=False, disable=None),
        )
        result["llm"] = {
            "sequences": spiking["num_sequences"],
            "tokens": int(context["llm_energy_tokens"].numel()),
            **_save_energy(spiking, out, "llm"),
        }
        log(
            f"LLM energy per {settings.window}-token window: spiking {spiking['snn_mJ_per_sequence']:.3f} mJ vs "
            f"real-valued {spiking['ann_mJ_per_sequence']:.3f} mJ (spiking / real-valued "
            f"{spiking['snn_mJ_per_sequence'] / spiking['ann_mJ_per_sequence']:.2f}x, perplexity "
            f"{figures['llm']['perplexity']['ratio']:.2f}x); mean firing rate {spiking['mean_firing_rate']:.3f}"
        )
    return result


# ----------------------------------------------------------------------------------------------
# the whole demo
# ----------------------------------------------------------------------------------------------


def _earlier_parts(path: Path, ran: list[str]) -> dict:
    """The figures of the parts this run skipped, kept from the directory's previous ``figures.json`` (a run of
    ``--parts llm`` into a directory that holds a whole run keeps the classifier's figures), each marked there."""
    import json

    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    kept = {p: previous[p] for p in PARTS if p not in ran and p in previous}
    kept.update({p: f for p, f in previous.get("earlier", {}).items() if p not in ran and p not in kept})
    return kept


def run_demo(settings: DemoSettings, out: Path, log=print) -> dict:
    """Run the parts of ``settings`` into the prepared directory ``out``; write ``figures.json``, ``report.md`` and
    ``summary.png``; return the figures."""
    from spikelm.outputs import write_json_atomic

    from .demo_report import write_report

    settings.check()
    started = time.perf_counter()
    figures: dict = {"settings": {k: v for k, v in asdict(settings).items() if k != "extra"}, "seconds": {}}
    context: dict = {}
    steps = [p for p in PARTS if p in settings.parts]
    for number, part in enumerate(steps, 1):
        log(f"== {number}/{len(steps)} {part}")
        part_started = time.perf_counter()
        if part == "classifier":
            figures["classifier"] = run_classifier(settings, out, log)
            for line in classifier_summary_lines(figures["classifier"]):
                log(line)
        elif part == "llm":
            figures["llm"] = run_llm(settings, out, log, context)
            for line in llm_summary_lines(figures["llm"]):
                log(line)
        else:
            figures["energy"] = run_energy(settings, out, log, context, figures)
        figures["seconds"][part] = round(time.perf_counter() - part_started, 1)
        log(f"({part}: {figures['seconds'][part] / 60:.1f} min)")
    figures["seconds"]["total"] = round(time.perf_counter() - started, 1)
    figures["peak_rss_mb"] = round(_peak_rss_mb())
    figures["earlier"] = _earlier_parts(out / "figures.json", steps)
    write_json_atomic(out / "figures.json", figures)
    write_report(figures, out)
    log(
        f"demo done in {figures['seconds']['total'] / 60:.1f} min (peak RSS {figures['peak_rss_mb'] / 1024:.1f} GB); "
        f"summary {out / 'report.md'}, figures {out / 'figures.json'}"
    )
    return figures
