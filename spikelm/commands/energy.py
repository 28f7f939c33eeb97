"""``spikelm energy``: operation counts, firing rates and energy of a model on real text (SPEC section 6): a native
SpikeLM, a converted model (``spikelm spikify``), its real-valued source (the ANN figure) or a named source."""

from __future__ import annotations

from pathlib import Path

from spikelm.errors import UserError

from .argtypes import (
    add_output_dir,
    device,
    existing_dir,
    integer,
    model_source,
    nonnegative_number,
    positive_int,
    text_file,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def register(sub) -> None:
    from spikelm.evaluation.energy_constants import E_AC_PJ, E_MAC_PJ, MEMORY_PJ_PER_BIT

    p = sub.add_parser(
        "energy",
        help="count ACs/MACs from the spikes a model emits on real text and estimate its energy",
        description=(
            "Tokenize a text file and pack it into full windows of --max-length tokens (or take the examples of a "
            "fine-tuning task's split, padded, counting real tokens only), run the model on them and "
            "count, per layer and time step, the operations of every matrix product from the spikes actually "
            "emitted: E = E_AC x ACs + E_MAC x MACs, per sequence, summed over the T steps, averaged over the "
            "sequences, against the same shape run real-valued (ANN). Writes energy.json, report.md and PNG plots. "
            "--model: a SpikeLM directory, a converted model (spikelm spikify: a signed or GIF spike of level k is "
            "k accumulates per fan-out, scale (and GIF's zero-point) terms are MACs), a real-valued transformers model "
            "of a family spikify converts (its ANN figure), or a named source (smollm2-135m, minilm). Causal converted "
            "and source models also get the energy per generated token: one decode step (a new token attending a "
            "filled cache of the window's other tokens). Beside the headline, energy.json and report.md give both "
            "models at the same weight precision (fp32, bf16, int8: Horowitz's 45 nm add and multiply-add energies) "
            "and a memory-inclusive figure: every weight read per token at --memory-pj-per-bit, a spiking linear "
            "skipping the weight rows of the channels that fire nothing at any step (docs/CONVERSION.md, Energy)."
        ),
    )
    p.add_argument(
        "--model",
        type=model_source,
        required=True,
        help="a model directory written by save_pretrained (SpikeLM, converted, or real-valued), or smollm2-135m / "
        "gemma3-270m / minilm",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--text-file", type=text_file, help="UTF-8 text to tokenize (tokenizer of --model, else bert-base-uncased)"
    )
    source.add_argument(
        "--task",
        help="a fine-tuning task (GLUE name, an offline analogue's layout, or custom): its "
        "examples are padded per batch and only real tokens are counted",
    )
    p.add_argument(
        "--data-dir",
        type=existing_dir,
        help="with --task: the task's folder in GLUE layout (default: the hub's nyu-mll/glue)",
    )
    p.add_argument("--split", help="with --task: the split to run (default: the task's first dev split)")
    p.add_argument("--text-columns", default="text", help="with --task custom: one or two comma-separated columns")
    p.add_argument("--label-column", default="label", help="with --task custom: the label column")
    p.add_argument(
        "--max-length", type=integer(2), default=128, help="tokens per window, special tokens included (default 128)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    p.add_argument(
        "--max-sequences", type=positive_int, help="count at most this many windows (default: every full window)"
    )
    p.add_argument(
        "--ac-pj", type=nonnegative_number, default=E_AC_PJ, help=f"energy of one accumulate in pJ (default {E_AC_PJ})"
    )
    p.add_argument(
        "--mac-pj",
        type=nonnegative_number,
        default=E_MAC_PJ,
        help=f"energy of one multiply-accumulate in pJ (default {E_MAC_PJ})",
    )
    p.add_argument(
        "--memory-pj-per-bit",
        type=nonnegative_number,
        default=MEMORY_PJ_PER_BIT,
        help=f"energy of reading one weight bit in pJ for the memory-inclusive figure (default {MEMORY_PJ_PER_BIT}: "
        "Horowitz's 45 nm DRAM read, 1.3 nJ per 64 bits; SRAM is 10-100 pJ per 64 bits)",
    )
    p.add_argument(
        "--device", type=device, help="where to run the model, e.g. cpu or cuda (default: cuda if available, else cpu)"
    )
    add_output_dir(p)
    p.set_defaults(func=run)


def load_tokenizer(model_dir: Path, model_config):
    """The tokenizer saved with the model, else the packaged bert-base-uncased WordPiece."""
    from transformers import AutoTokenizer

    from spikelm.data.tokenization import check_fits, load_bert_tokenizer

    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        tokenizer = load_bert_tokenizer()
    check_fits(model_config, tokenizer, what=f"--model {model_dir}", tokenizer_flag=f"the tokenizer for {model_dir}")
    return tokenizer


def text_features(text_file: Path, tokenizer, max_length: int) -> tuple[list[dict], str]:
    """Full windows of ``max_length`` tokens from a text file, and a description of them."""
    if not text_file.is_file():
        raise UserError(f"--text-file {text_file} does not exist or is not a file")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--text-file {text_file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise UserError(f"--text-file {text_file} is empty: give a file with text to tokenize")
    from spikelm.evaluation.energy_report import pack_windows

    windows = pack_windows(text, tokenizer, max_length)
    if not windows:
        n_tokens = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        raise UserError(
            f"--text-file {text_file} has {n_tokens} tokens, fewer than one full window of --max-length "
            f"{max_length}; use a longer text or a smaller --max-length"
        )
    return [{"input_ids": w} for w in windows], f"windows of {max_length} tokens from {text_file.name}"


def task_features(args, tokenizer) -> tuple[list[dict], str]:
    """The examples of one split of a fine-tuning task, tokenized (truncated to --max-length, unpadded)."""
    from spikelm.training.finetune import CustomColumns, encode, load_task_data

    custom = None
    if args.task == "custom":
        custom = CustomColumns(tuple(c for c in args.text_columns.split(",") if c), args.label_column)
    data = load_task_data(
        args.task, args.data_dir, need_train=args.split == "train", custom=custom, model_name=args.model
    )
    split = args.split or data.task.dev_splits[0]
    if split not in data.splits:
        raise UserError(f"--split {split!r} is not a split of task {args.task}; choose one of {sorted(data.splits)}")
    examples = data.splits[split]
    if len(examples) == 0:
        raise UserError(f"split {split} of task {args.task} has no examples")
    features = [{k: v for k, v in f.items() if k != "labels"} for f in encode(tokenizer, examples, args.max_length)]
    return features, f"examples of {args.task}/{split} (padded per batch, real tokens only)"


def run(args) -> int:
    from tqdm import tqdm

    from spikelm.evaluation.energy import EnergyConstants, measure_energy
    from spikelm.evaluation.energy_report import padded_batches, write_energy_report
    from spikelm.outputs import prepare_output_dir, write_json_atomic

    for flag, value in (
        ("--max-length", args.max_length),
        ("--batch-size", args.batch_size),
        ("--max-sequences", args.max_sequences),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    for flag, value in (
        ("--ac-pj", args.ac_pj),
        ("--mac-pj", args.mac_pj),
        ("--memory-pj-per-bit", args.memory_pj_per_bit),
    ):
        if not value >= 0:
            raise UserError(f"{flag} must be a non-negative energy in picojoules, got {value}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {args.device!r} is not a torch device ({err})") from None
    from spikelm.data.tokenization import check_fits
    from spikelm.evaluation.loading import NATIVE, SOURCE, inspect_model, load_model

    spec = inspect_model(args.model)
    config = spec.config
    check_fits(config, length=args.max_length, what=f"--model {args.model}")
    tokenizer = load_tokenizer(spec.path, config)
    if args.task is not None:
        features, source = task_features(args, tokenizer)
    else:
        if args.data_dir or args.split:
            raise UserError("--data-dir and --split go with --task, not --text-file")
        features, source = text_features(Path(args.text_file), tokenizer, args.max_length)
    features = features[: args.max_sequences]
    out = prepare_output_dir(args.output_dir, "energy", args.overwrite, inputs={"--model": spec.path})
    model = load_model(spec, device)

    batches = list(padded_batches(features, tokenizer, args.batch_size))
    constants = EnergyConstants(args.ac_pj, args.mac_pj)
    summary = measure_energy(
        model,
        batches,
        constants,
        progress=lambda b: tqdm(b, desc="energy", unit="batch", disable=None),
        memory_pJ_per_bit=args.memory_pj_per_bit,
    )
    spiking = summary["spiking"]
    summary.update(
        model=str(args.model),
        model_kind=spec.kind,
        architecture=type(model).__name__,
        source=source,
        sequence_length=args.max_length,
        description=(
            f"{type(model).__name__} ({spec.describe().split('(', 1)[1]}: {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, {_spiking_words(spec)}; {len(features)} {source}."
        ),
    )
    if spec.kind != NATIVE and spec.causal:
        from spikelm.evaluation.energy import measure_decode_energy

        decode = measure_decode_energy(
            model,
            batches,
            constants,
            progress=lambda b: tqdm(b, desc="decode step", unit="batch", disable=None),
            memory_pJ_per_bit=args.memory_pj_per_bit,
        )
        summary["per_generated_token"] = {
            key: decode[key]
            for key in (
                "context_tokens",
                "num_sequences",
                "snn_mJ_per_sequence",
                "ann_mJ_per_sequence",
                "ratio",
                "acs",
                "macs",
                "ann_macs",
                "mean_firing_rate",
                "whole_model",
                "per_layer",
                "heads",
                "precisions",
                "memory",
            )
        }
    write_json_atomic(out / "energy.json", summary)
    write_energy_report(summary, out)

    c = summary["constants_pJ"]
    print(
        f"{summary['description']} E = {c['ac']} pJ x ACs + {c['mac']} pJ x MACs, per sequence, headline = "
        "matrix products of the blocks (heads, softmax, LayerNorm, activations outside)"
    )
    if spiking:
        print(
            f"SNN: {summary['snn_mJ_per_sequence']:.4f} mJ per sequence ({summary['acs'] / 1e9:.4g} G ACs + "
            f"{summary['macs'] / 1e6:.4g} M MACs); ANN: {summary['ann_mJ_per_sequence']:.4f} mJ "
            f"({summary['ann_macs'] / 1e9:.4g} G MACs); ratio ANN/SNN {summary['ratio']:.2f}; mean firing rate "
            f"{summary['mean_firing_rate']:.4f} (per step "
            f"{' '.join(f'{r:.3f}' for r in summary['firing_rate_per_step'])})"
        )
    else:
        why = "a real-valued transformers model" if spec.kind == SOURCE else "not spiking (config.spiking=False)"
        print(
            f"note: the model is {why}: it runs real-valued, so only the ANN energy "
            f"is reported: {summary['ann_mJ_per_sequence']:.4f} mJ per sequence "
            f"({summary['ann_macs'] / 1e9:.4g} G MACs)"
        )
    whole = summary["whole_model"]
    print(
        "whole model (+ heads, norms, softmax, activations as MACs) per token: "
        + (f"SNN {whole['snn_mJ_per_token'] * 1e3:.2f} uJ, " if spiking else "")
        + f"ANN {whole['ann_mJ_per_token'] * 1e3:.2f} uJ"
        + (f", ratio ANN/SNN {whole['ratio']:.2f}" if whole["ratio"] else "")
    )
    generated = summary.get("per_generated_token")
    if generated is not None:
        whole = generated["whole_model"]
        print(
            f"per generated token (one decode step after {generated['context_tokens']:.0f} cached tokens), whole "
            "model: "
            + (f"SNN {whole['snn_mJ_per_sequence'] * 1e3:.2f} uJ, " if spiking else "")
            + f"ANN {whole['ann_mJ_per_sequence'] * 1e3:.2f} uJ"
            + (f", ratio ANN/SNN {whole['ratio']:.2f}" if whole["ratio"] else "")
            + "; blocks only: "
            + (f"SNN {generated['snn_mJ_per_sequence'] * 1e3:.2f} uJ, " if spiking else "")
            + f"ANN {generated['ann_mJ_per_sequence'] * 1e3:.2f} uJ"
        )
    for line in precision_lines(summary):
        print(line)
    print(f"wrote {out / 'energy.json'}, {out / 'report.md'} and plots")
    return 0


def _spiking_words(spec) -> str:
    config = spec.config
    if spec.kind == "native":
        return (
            f"T={config.num_steps}, {config.spike_levels} spikes" if config.spiking else "real-valued (spiking=False)"
        )
    if spec.kind == "source":
        return "real-valued"
    quant = config.quantization_config
    from spikelm.nn.neurons import neuron_class

    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return neuron_class(quant.get("neuron", "elastic")).summary(quant)


def precision_lines(summary: dict) -> list[str]:
    """One line per precision: the blocks and the whole model per token, compute only and with weight reads."""
    spiking = summary["spiking"]
    memory = summary["memory"]
    lines = [
        f"same weight precision, per token (uJ; SNN / ANN{' = ratio' if spiking else ''}); memory-inclusive adds every "
        f"weight read at {memory['pJ_per_bit']:.4g} pJ per bit"
        + (
            f" (the spiking model skips {memory['whole_model']['skipped_fraction']:.1%} of the reads)"
            if spiking
            else ""
        )
        + ":"
    ]
    for name, p in summary["precisions"].items():
        cells = []
        for scope in ("blocks", "whole_model", "blocks_with_memory", "whole_model_with_memory"):
            e = p[scope]
            ann = f"{e['ann_mJ_per_token'] * 1e3:.4g}"
            cells.append(
                f"{scope} "
                + (f"{e['snn_mJ_per_token'] * 1e3:.4g} / {ann} = {e['snn_over_ann']:.3f}" if spiking else ann)
            )
        lines.append(f"  {name} (add {p['add_pJ']} pJ, MAC {p['mac_pJ']:.3g} pJ): " + "; ".join(cells))
    return lines
