"""``spikelm glue``: fine-tune (or evaluate) one model on a list of tasks and print the paper's table."""

from __future__ import annotations

from pathlib import Path

from spikelm.errors import UserError

from .argtypes import add_output_dir, dir_or_name, existing_dir
from .finetune import add_recipe_arguments, settings_from_args


def register(sub) -> None:
    from spikelm.evaluation.glue.models import VARIANTS

    p = sub.add_parser(
        "glue",
        help="run a list of GLUE(-style) tasks for one model and print the paper's table",
        description="Fine-tune MODEL on each task (as `spikelm finetune`, into OUTPUT_DIR/<variant>/<task>), then "
        "write glue_results.md (the paper's layout: per-task metric at the best dev epoch, average "
        "counting MNLI-m and -mm separately) and glue_results.json (best and last epochs). --variants "
        "runs the paper's baselines from the same checkpoint on equal terms: "
        + "; ".join(f"{k}: {v or 'as saved'}" for k, v in VARIANTS.items())
        + ".",
    )
    p.add_argument(
        "--model",
        type=dir_or_name,
        required=True,
        help="as for `spikelm finetune`; with --eval-only, a `spikelm glue` output directory (or a model "
        "fine-tuned for the task)",
    )
    p.add_argument(
        "--tasks",
        default="glue",
        help="'glue' (MNLI, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE; default), 'offline' (the offline "
        "suite) or a comma-separated list of task names",
    )
    p.add_argument(
        "--data-dir",
        type=existing_dir,
        help="GLUE tasks: the GLUE distribution's root (DIR/SST-2/train.tsv ...; default: the hub); "
        "offline tasks: the output of `spikelm data prepare-glue-offline`",
    )
    p.add_argument("--variants", default="model", help=f"comma-separated, from {', '.join(VARIANTS)} (default: model)")
    add_recipe_arguments(p)
    p.add_argument("--eval-only", action="store_true", help="evaluate already fine-tuned models, no training")
    add_output_dir(p)
    p.set_defaults(func=run)


def _model_for(args, variant: str, task: str) -> str:
    if not args.eval_only:
        return args.model
    for candidate in (Path(args.model) / variant / task, Path(args.model) / task):
        if (candidate / "config.json").is_file():
            return str(candidate)
    return args.model


def run(args) -> int:
    from spikelm.evaluation.glue.models import VARIANTS
    from spikelm.evaluation.glue.report import markdown_table, resolve_tasks
    from spikelm.outputs import prepare_output_dir, write_json_atomic, write_text_atomic
    from spikelm.training.finetune import CustomColumns, finetune

    tasks = resolve_tasks(args.tasks)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.eval_only and variants != ["model"] and not Path(args.model, variants[0]).is_dir():
        raise UserError("--eval-only with --variants needs --model to be a `spikelm glue` output directory")
    offline = [t.name for t in tasks if t.folder is not None]
    if offline and args.data_dir is None:
        raise UserError(f"tasks {offline} need --data-dir (the output of `spikelm data prepare-glue-offline`)")
    settings = settings_from_args(args)
    settings.check()
    out = prepare_output_dir(args.output_dir, "glue", args.overwrite)
    results: dict[str, dict] = {v: {} for v in variants}
    for variant in variants:
        for task in tasks:
            print(f"== {variant} / {task.name}")
            data_dir = None if args.data_dir is None else str(Path(args.data_dir) / (task.folder or ""))
            results[variant][task.name] = finetune(
                _model_for(args, variant, task.name),
                task.layout,
                str(out / variant / task.name),
                data_dir,
                settings,
                {} if args.eval_only else VARIANTS[variant],
                args.tokenizer,
                CustomColumns(),
                args.eval_only,
                args.overwrite,
                log=print,
            )
            write_json_atomic(
                out / "glue_results.json", {"model": args.model, "tasks": [t.name for t in tasks], "results": results}
            )
    table = markdown_table(tasks, results)
    note = (
        "Dev-set scores x 100 at the best epoch (the paper's choice; glue_results.json also holds the last "
        "epoch). avg counts MNLI-m and -mm separately; WNLI is not averaged."
    )
    write_text_atomic(out / "glue_results.md", table + "\n\n" + note + "\n")
    print(table)
    print(note)
    print(f"wrote {out / 'glue_results.md'} and {out / 'glue_results.json'}")
    return 0
