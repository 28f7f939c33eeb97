"""``spikelm demo``: the README's main job, a short tour of spiking language models made from pretrained ones
(:mod:`spikelm.experiments.demo`): a spiking classifier beside its real-valued teacher, a spiking LLM's perplexity
and continuations, and their energy. Pretraining from scratch is ``spikelm pretrain`` / ``spikelm reproduce``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import add_output_dir, integer, positive_number, text_file

PARTS = ("classifier", "llm", "energy")  # spikelm.experiments.demo.PARTS (not imported: it would load torch)

# flags of the earlier demo (pretraining a tiny model from scratch), refused by name
REMOVED = {
    "--corpus": "the demo no longer pretrains; pretrain on a corpus with `spikelm pretrain --corpus`",
    "--minutes": "the demo no longer pretrains; see `spikelm pretrain` (the paper's recipe, which needs GPUs)",
    "--max-steps": "the demo no longer pretrains; see `spikelm pretrain` (the paper's recipe, which needs GPUs)",
    "--set": "the demo no longer pretrains a preset; see `spikelm pretrain --set`",
}


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(PARTS)}; got {text!r}"
            + (f" ({', '.join(bad)} unknown)" if bad else "")
        )
    return parts


class _Removed(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was removed: {REMOVED[option_string]}")


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: spiking models made from pretrained MiniLM and SmolLM2, measured (CPU, about 20 min)",
        description=(
            "A short tour of what spikelm is for, on the CPU, with nothing but pip (models and data are fetched once "
            "and cached). classifier: MiniLM-L6 fine-tuned on multiemo-sst2 sentiment as a real-valued teacher, "
            "then as SpikeLM (ternary spikes, T=4) from the same weights distilling the teacher; test accuracy of "
            "both beside the majority class. llm: SmolLM2-135M made to spike without training (spikify's default "
            "recipe, signed spikes: spikelm spikify --help), perplexity beside the real-valued model's, and greedy "
            "continuations of fixed prompts with tokens/s. energy: the spiking models' energy and firing rates "
            "against their real-valued sources (the LLM's with its perplexity ratio beside it). Writes report.md, "
            "figures.json, summary.png and the models under --output-dir. Pretraining from scratch is `spikelm "
            "pretrain` / `spikelm reproduce` (the paper's recipe, which needs GPUs)."
        ),
    )
    p.add_argument(
        "--parts",
        type=_parts,
        default=PARTS,
        help=f"which parts to run, comma-separated (default: {','.join(PARTS)}; energy measures the models of "
        "the other parts of the same run)",
    )
    p.add_argument(
        "--text-file",
        type=text_file,
        help="your UTF-8 text for the llm part: its first --eval-tokens tokens for perplexity, the next "
        "--calibration-sequences x 512 to calibrate (default: the Brown text for perplexity, the pypi corpus "
        "to calibrate)",
    )
    g = p.add_argument_group("budget")
    g.add_argument(
        "--finetune-samples",
        type=integer(1),
        default=2000,
        help="classifier training sentences (default 2000)",
    )
    g.add_argument("--finetune-epochs", type=integer(1), default=2, help="epochs of the spiking classifier (default 2)")
    g.add_argument("--teacher-epochs", type=integer(1), default=2, help="epochs of the real-valued teacher (default 2)")
    g.add_argument("--finetune-lr", type=positive_number, default=5e-5, help="fine-tuning learning rate (default 5e-5)")
    g.add_argument(
        "--student-from",
        choices=("teacher", "source"),
        default="teacher",
        help="the spiking classifier starts from the fine-tuned teacher's weights (default) or from MiniLM's",
    )
    g.add_argument(
        "--dev-examples",
        type=integer(1),
        default=1000,
        help="dev sentences the best epoch is picked on (default 1000; the test split is always scored whole)",
    )
    g.add_argument(
        "--eval-tokens", type=integer(1024), default=4096, help="perplexity tokens of the llm part (default 4096)"
    )
    g.add_argument(
        "--calibration-sequences",
        type=integer(1),
        default=8,
        help="calibration sequences of 512 tokens for the conversion (default 8; spikify's default is 32)",
    )
    for flag in REMOVED:
        p.add_argument(flag, nargs="?", action=_Removed, help=argparse.SUPPRESS)
    add_output_dir(p, required=False)
    p.set_defaults(func=run, output_dir="runs/demo")


def settings_from_args(args):
    from spikelm.experiments.demo import DemoSettings

    return DemoSettings(
        parts=tuple(args.parts),
        text_file=str(args.text_file) if args.text_file else None,
        finetune_samples=args.finetune_samples,
        finetune_epochs=args.finetune_epochs,
        teacher_epochs=args.teacher_epochs,
        finetune_lr=args.finetune_lr,
        dev_examples=args.dev_examples,
        student_from=args.student_from,
        eval_tokens=args.eval_tokens,
        calibration_sequences=args.calibration_sequences,
    )


def run(args) -> int:
    from spikelm.experiments.demo import check_text_file_size, run_demo
    from spikelm.outputs import check_output_dir, prepare_output_dir

    settings = settings_from_args(args)
    settings.check()
    check_text_file_size(settings)
    check_output_dir(Path(args.output_dir), "demo", args.overwrite)
    out = prepare_output_dir(Path(args.output_dir), "demo", args.overwrite)
    run_demo(settings, out)
    return 0
