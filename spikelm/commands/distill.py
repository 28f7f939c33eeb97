"""``spikelm distill``: distil a (spiking) causal LM student toward a real-valued teacher
(see :mod:`spikelm.training.distill`)."""

from __future__ import annotations

from .argtypes import add_output_dir, integer, model_dir_not_named, model_ref, text_file, text_path


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a (spiking) causal LM student toward a real-valued teacher (KL on next-token distributions)",
        description=(
            "Train the student toward the teacher on causal blocks of a corpus (default: the pypi corpus, tokenized "
            "with the teacher's tokenizer): loss = kl_weight * T^2 * KL(teacher || student) at temperature T "
            "(default 1) + hidden_weight * MSE of hidden states (default 0). Runs on accelerate: one CPU/GPU, or "
            "several GPUs with `accelerate launch --num_processes N -m spikelm distill ...` (FSDP through an "
            "accelerate config; see docs/DISTILLATION.md). Reports held-out KL and perplexity at the start, every "
            "eval_every steps and the end (train_log.jsonl, distill_curve.png), writes checkpoints for --resume, "
            "metrics.json, TensorBoard logs and the student (save_pretrained) with the teacher's tokenizer."
        ),
    )
    p.add_argument(
        "--teacher",
        type=model_ref,
        required=True,
        metavar="SRC",
        help="the real-valued teacher: a causal LM directory (or a named source where available)",
    )
    p.add_argument(
        "--student",
        type=model_dir_not_named,
        required=True,
        metavar="DIR",
        help="the student: a causal LM directory sharing the teacher's vocabulary (e.g. written by "
        "`spikelm spikify`); loaded with AutoModelForCausalLM after `import spikelm`",
    )
    p.add_argument(
        "--corpus",
        metavar="NAME|PATH",
        help="a named corpus (default pypi), a saved dataset, a directory or a text file",
    )
    p.add_argument(
        "--text-file",
        type=text_path,
        metavar="F",
        help="a plain-text file as the corpus (a blank line between documents)",
    )
    p.add_argument("--max-steps", type=integer(1), help="optimizer steps (default 1000)")
    p.add_argument("--config", type=text_file, metavar="FILE", help="YAML/JSON file of config fields")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field (repeatable): temperature, kl_weight, hidden_weight, hidden_layers "
        "(last|all), learn_alpha, freeze_embeddings, freeze_lm_head, learning_rate, batch_size, "
        "grad_accum, max_length, warmup_ratio, eval_every, eval_examples, eval_text (a file for a "
        "perplexity-vs-tokens curve), save_every, mixed_precision, seed, ...",
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
    from spikelm.outputs import is_main_process

    from ..training.distill import resolve_distill_config, run_distillation

    config = resolve_distill_config(
        args.config,
        args.sets,
        teacher=args.teacher,
        student=args.student,
        corpus=args.corpus,
        text_file=args.text_file,
        max_steps=args.max_steps,
    )
    result = run_distillation(
        config, args.output_dir, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress, log=print
    )
    if not is_main_process():  # one summary under `accelerate launch` / torchrun
        return 0
    m = result.metrics
    start, end = m["initial_validation"]["validation"], m["final_validation"]["validation"]
    print(
        f"wrote {result.output_dir}: {m['steps']} steps, {m['train_tokens']} tokens, held-out KL {start['kl']:.4f} "
        f"-> {end['kl']:.4f}, perplexity {start['perplexity']:.2f} -> {end['perplexity']:.2f} (teacher "
        f"{end['teacher_perplexity']:.2f}), {m['tokens_per_second']:.0f} tokens/s"
    )
    if "eval_text" in m["final_validation"]:
        a, b = m["initial_validation"]["eval_text"], m["final_validation"]["eval_text"]
        print(
            f"eval_text perplexity {a['perplexity']:.2f} -> {b['perplexity']:.2f} (teacher "
            f"{b['teacher_perplexity']:.2f})"
        )
    return 0
