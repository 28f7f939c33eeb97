"""``spikelm reproduce``: the paper's comparison (ANN, LIF-BERT, SpikeLM T=1/T=4, ablations) under one budget."""

from __future__ import annotations

from argparse import ArgumentTypeError

from spikelm.errors import UserError

from .argtypes import add_output_dir, check_bounds, integer, positive_int, positive_number


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated non-negative integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise UserError(f"{flag} expects comma-separated non-negative integers, got {text!r}")
    for value in values:
        try:
            check_bounds(flag, value)
        except ArgumentTypeError as err:
            raise UserError(f"{flag} {err}") from None
    return values


def register(sub) -> None:
    from spikelm.experiments.reproduce import DEFAULT_TASKS, VARIANTS, Budget

    d = Budget()
    p = sub.add_parser(
        "reproduce",
        help="pretrain + fine-tune the paper's models under one budget and compare them (SPEC section 5)",
        description=(
            "Pretrain each model from scratch on the same corpus, steps, tokens and seeds, fine-tune each on the same "
            "subsets of the offline GLUE-style suite with the same recipe, count energy and firing rates, and write "
            "the paper's table beside ours (OUTPUT_DIR/report/). Rows (variant, seed) already finished in OUTPUT_DIR "
            "are skipped; an interrupted row resumes. Variants: "
            + "; ".join(f"{n}: {v.model}" for n, v in VARIANTS.items())
            + ". Several GPUs: `accelerate launch -m spikelm reproduce ...`."
        ),
    )
    p.add_argument("--suite", help="the offline suite (`spikelm data prepare-glue-offline --output-dir DIR`)")
    p.add_argument("--corpus", default=d.corpus, help=f"pretraining corpus, a name or a path (default {d.corpus})")
    p.add_argument("--preset", default=d.preset, help=f"pretraining preset: shape and recipe (default {d.preset})")
    p.add_argument(
        "--pretrain-steps",
        type=positive_int,
        default=d.pretrain_steps,
        help=f"optimizer steps of pretraining, every model (default {d.pretrain_steps})",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a pretraining recipe or SpikeLMConfig field for every model (repeatable)",
    )
    p.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help=f"offline tasks (default {','.join(DEFAULT_TASKS)})"
    )
    p.add_argument(
        "--train-samples",
        type=positive_int,
        default=d.train_samples,
        help=f"training examples per task, a fixed random subset (default {d.train_samples})",
    )
    p.add_argument(
        "--dev-samples",
        type=positive_int,
        default=d.dev_samples,
        help=f"examples per dev split, a fixed random subset (default {d.dev_samples})",
    )
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"fine-tuning epochs (default {d.epochs})")
    p.add_argument(
        "--learning-rate",
        type=positive_number,
        default=d.learning_rate,
        help=f"fine-tuning AdamW learning rate, constant (default {d.learning_rate})",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help=f"fine-tuning batch (default {d.batch_size})"
    )
    p.add_argument(
        "--max-length", type=integer(2), default=d.max_length, help=f"tokens per example (default {d.max_length})"
    )
    p.add_argument(
        "--energy-sequences",
        type=positive_int,
        default=d.energy_sequences,
        help=f"windows of --max-length tokens of the corpus for the energy count (default {d.energy_sequences})",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="which variants (default: all; main rows run first)")
    p.add_argument("--seeds", default="0,1", help="seeds of the main rows (default 0,1)")
    p.add_argument("--ablation-seeds", default="0", help="seeds of the ablation rows (default 0)")
    p.add_argument(
        "--max-minutes",
        type=positive_number,
        help="start no new row after this many minutes (a rerun continues with the rest)",
    )
    p.add_argument(
        "--doc",
        help="also fill the generated block of this markdown file (e.g. docs/REPRODUCTION.md) "
        "and copy the plots beside it",
    )
    p.add_argument(
        "--doc-block",
        metavar="NAME",
        help="with --doc: fill the block marked <!-- reproduce-NAME:begin/end --> instead (several runs "
        "in one document; plots under reproduction/NAME/)",
    )
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the finished rows")
    add_output_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from spikelm.experiments.reproduce import VARIANTS, Budget, run_experiment
    from spikelm.experiments.reproduce_report import markdown, write_report
    from spikelm.training.presets import parse_value

    if args.doc_block is not None and args.doc is None:
        raise UserError("--doc-block names a block of the --doc file; give --doc too")
    if args.doc is not None:  # before any row runs, not after the first one
        from spikelm.experiments.reproduce_report import check_doc

        try:
            check_doc(args.doc, args.doc_block)
        except ValueError as error:
            raise UserError(str(error)) from None
    if args.report_only:
        if not (Path(args.output_dir) / "data" / "summary.json").is_file():
            raise UserError(f"--report-only: {args.output_dir} holds no `spikelm reproduce` run")
        print(markdown(write_report(Path(args.output_dir), list(VARIANTS), args.doc, args.doc_block)))
        return 0
    if args.suite is None:
        raise UserError("--suite is required: the offline suite built by `spikelm data prepare-glue-offline`")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    for flag in (
        "pretrain_steps",
        "train_samples",
        "dev_samples",
        "epochs",
        "batch_size",
        "max_length",
        "energy_sequences",
    ):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive, got {args.learning_rate}")
    overrides = {}
    for item in args.sets:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[name.strip()] = parse_value(value)
    budget = Budget(
        preset=args.preset,
        corpus=args.corpus,
        pretrain_steps=args.pretrain_steps,
        pretrain_overrides=overrides,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        train_samples=args.train_samples,
        dev_samples=args.dev_samples,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_length=args.max_length,
        energy_sequences=args.energy_sequences,
    )
    rows = run_experiment(
        budget,
        args.suite,
        args.output_dir,
        variants,
        _ints(args.seeds, "--seeds"),
        _ints(args.ablation_seeds, "--ablation-seeds"),
        args.max_minutes,
        args.overwrite,
        args.doc,
        doc_block=args.doc_block,
        log=print,
    )
    print(f"{len(rows)} row(s) in {args.output_dir}/rows; report: {args.output_dir}/report/results.md")
    return 0
