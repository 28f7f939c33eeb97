"""Zero-shot evaluation with lm-eval (EleutherAI's lm-evaluation-harness): a ``spikelm`` model type and task files.

Install the extra: ``pip install 'spikelm[eval]'``. Importing this module registers the lm-eval model type
``spikelm``: lm-eval's Hugging Face model (``hf``, :class:`lm_eval.models.huggingface.HFLM`) with spikelm
imported first, so that a spiking checkpoint saved by spikelm loads through ``from_pretrained``, and with the
named sources of :mod:`spikelm.data.pretrained` accepted as ``pretrained=`` (e.g. ``pretrained=smollm2-135m``).
Every other ``--model_args`` key is HFLM's (``dtype``, ``device``, ``batch_size``, ...).

:data:`TASKS_DIR` holds local task files (lm-eval's ``include_path``) for BIG-bench multiple-choice tasks built
from the packaged BIG-bench data (:mod:`spikelm.evaluation.bigbench_mc`, which lists each task's size and
chance level): ``spikelm_hyperbaton``, ``spikelm_epistemic``, ``spikelm_vitaminc``, ``spikelm_fever``,
``spikelm_goal_inference``, and the group ``spikelm_bigbench`` of all five.

From the command line, lm-eval's own options, with ``--model spikelm`` and these tasks as defaults::

    python -m spikelm.evaluation.lm_eval_adapter --model_args pretrained=smollm2-135m \\
        --tasks spikelm_hyperbaton,spikelm_epistemic --limit 200 --batch_size 8 --output_path out/

From Python, ``lm_eval.simple_evaluate(model="spikelm", model_args="pretrained=DIR", tasks=[...],
task_manager=task_manager())`` after importing this module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

# registers model_type "spikelm"; `import spikelm` (implied) makes converted checkpoints' quantization method known
import spikelm.models  # noqa: F401

from ..data.pretrained import resolve_model_source

TASKS_DIR = Path(__file__).resolve().parent.parent / "resources" / "lm_eval_tasks"
MODEL_TYPE = "spikelm"


def _local(source):
    """A named source -> its directory (fetched on first use); paths and hub names pass through."""
    if isinstance(source, (str, os.PathLike)):
        return str(resolve_model_source(source, allow_hub=True))
    return source  # an already-loaded model or tokenizer


@register_model(MODEL_TYPE)
class SpikeLMEvalModel(HFLM):
    """lm-eval's ``hf`` model for spikelm checkpoints and named sources (``pretrained=smollm2-135m``)."""

    def __init__(self, pretrained, tokenizer=None, **kwargs):
        super().__init__(pretrained=_local(pretrained), tokenizer=_local(tokenizer), **kwargs)


def task_manager(include_path: str | Path | list | None = None, include_defaults: bool = True):
    """An lm-eval ``TaskManager`` that knows spikelm's tasks (:data:`TASKS_DIR`), those under ``include_path`` and,
    with ``include_defaults``, lm-eval's own (indexing those takes a while: leave them out to run only spikelm's)."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else list(include_path) if isinstance(include_path, list) else [include_path]
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=include_defaults)


def harness_argv(argv: list[str]) -> list[str]:
    """lm-eval command-line arguments with spikelm's defaults: the ``run`` subcommand when none is given and
    ``--model spikelm`` unless ``--model`` is given."""
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "ls", "validate") else "run"
    if command == "run" and not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", MODEL_TYPE, *argv]
    return [command, *argv]


def main(argv: list[str] | None = None) -> int:
    """``lm-eval`` (its ``run``, ``ls`` and ``validate`` subcommands) with spikelm's model type as the default and
    spikelm's tasks (:data:`TASKS_DIR`) known beside lm-eval's and any ``--include_path`` (which wins a name clash)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    cli = HarnessCLI()
    args = cli._parser.parse_args(harness_argv(sys.argv[1:] if argv is None else argv))
    if getattr(args, "command", None) in ("run", "ls", "validate"):
        # lm-eval hands include_path to its TaskManager, which takes a list of directories
        args.include_path = [str(TASKS_DIR), *([args.include_path] if args.include_path else [])]
    cli.execute(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
