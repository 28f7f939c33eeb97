"""``spikelm pretrain``: pretrain SpikeLM from scratch (see :mod:`spikelm.training.pretrain`)."""

from __future__ import annotations

from .argtypes import add_output_dir, positive_int, text_file


def register(sub) -> None:
    from spikelm.data.objectives import OBJECTIVES
    from spikelm.training.presets import PRESETS

    p = sub.add_parser(
        "pretrain",
        help="pretrain a SpikeLM (MLM+NSP, MLM or causal LM) on a corpus",
        description=(
            "Pretrain SpikeLM from random initialisation on accelerate (one CPU/GPU; several GPUs or nodes with "
            "`accelerate launch` or `torchrun`). A preset carries a model shape and a training recipe; any field can "
            "be overridden with --config FILE (YAML/JSON) and --set FIELD=VALUE. Writes the model, tokenizer, "
            "train_log.jsonl, metrics.json, TensorBoard logs and checkpoints into --output-dir."
        ),
    )
    p.add_argument(
        "--preset",
        metavar="NAME",
        help=f"model shape + recipe: {', '.join(PRESETS)} (default tiny, or the config file's)",
    )
    p.add_argument("--objective", metavar="NAME", help=f"{' | '.join(OBJECTIVES)} (default mlm-nsp)")
    p.add_argument(
        "--corpus",
        metavar="NAME|PATH",
        help="a named corpus (pypi, public-domain; default pypi), a saved datasets dataset, a directory or "
        "a text file (a directory named like a corpus: ./NAME)",
    )
    p.add_argument(
        "--text-file",
        type=text_file,
        metavar="F",
        help="a plain-text file as the corpus (a blank line between documents)",
    )
    p.add_argument("--tokenizer", help="bert-base-uncased (default), gpt2 (default for clm), a directory or a hub name")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (default: the preset's)")
    p.add_argument("--config", type=text_file, metavar="FILE", help="YAML/JSON file of config fields")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipe or SpikeLMConfig field (repeatable), e.g. --set learning_rate=5e-4 --set num_steps=2",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in --output-dir from its latest checkpoint (or from CHECKPOINT)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from spikelm.training.presets import resolve_config, resolve_resumed_config
    from spikelm.training.pretrain import find_resume_checkpoint, recorded_config, run_pretraining

    flags = dict(
        objective=args.objective,
        corpus=args.corpus,
        text_file=args.text_file,
        tokenizer=args.tokenizer,
        max_steps=args.max_steps,
    )
    recorded = None
    if args.resume:  # the same run: its recorded settings, not the defaults (run_pretraining refuses changes)
        output_dir = Path(args.output_dir)
        checkpoint = find_resume_checkpoint(output_dir, args.resume)
        recorded = recorded_config(output_dir, checkpoint)
    if recorded is not None:
        config = resolve_resumed_config(recorded, "pretrain_config.json", args.preset, args.config, args.sets, **flags)
    else:
        config = resolve_config(args.preset, args.config, args.sets, **flags)
    result = run_pretraining(
        config, args.output_dir, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress, log=print
    )
    m = result.metrics
    start, end = m["initial_validation"], m["final_validation"]
    print(
        f"wrote {result.output_dir}: {m['steps']} steps, validation loss {start['loss']:.3f} -> {end['loss']:.3f}, "
        f"accuracy {start['accuracy']:.3f} -> {end['accuracy']:.3f} (unigram baseline loss "
        f"{m['unigram_baseline_loss']:.3f}), {m['tokens_per_second']:.0f} tokens/s"
    )
    if "perplexity" in end:
        print(
            f"validation perplexity {start['perplexity']:.1f} -> {end['perplexity']:.1f} (unigram baseline "
            f"{m['unigram_baseline_perplexity']:.1f})"
        )
    return 0
