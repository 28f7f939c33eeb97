"""Reproduce the paper's headline claims (SPEC section 5) at small scale, on real data, under one budget.

Every model of the comparison is pretrained from scratch and fine-tuned with exactly the same
budget: the same preset (shape and recipe), the same number of optimizer steps over the same
tokens (the data order is a function of the seed alone), the same fine-tuning subsets, recipe and
seeds. Only the spiking settings differ:

    ann          the real-valued model (spiking=False)
    lif-bert     {0,1} spikes, T=4 (the paper's LIF-BERT)
    spikelm-t1   ternary elastic spikes, T=1
    spikelm-t4   ternary elastic spikes, T=4
    ablations of spikelm-t4: the symmetric reset, and alpha learned (LSQ gradient) instead of frozen

A row is one (variant, seed): pretrain (``spikelm.training.pretrain.run_pretraining``), fine-tune on each task
(``spikelm.training.finetune.finetune``), then measure energy and firing rates
(``spikelm.evaluation.energy.measure_energy``) on 128-token windows of the corpus's validation split. Its
figures go to ``OUTPUT_DIR/rows/<variant>-seed<S>.json``, written atomically when the row is done;
a rerun skips finished rows, resumes a row's pretraining from its latest checkpoint and reuses its
finished fine-tuning runs. After every row the report (``spikelm.experiments.reproduce_report``) is rewritten.

The same code runs one process on a CPU or GPU, or several under ``accelerate launch``: pretraining
and fine-tuning are data-parallel, the bookkeeping, energy counts and report are done by the main
process.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spikelm.errors import UserError
from spikelm.outputs import prepare_output_dir, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

COMMAND = "reproduce"
DEFAULT_TASKS = ("multiemo-sst2", "vitaminc", "bbc-topics")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str  # as in the paper's table
    model: dict  # SpikeLMConfig fields set at pretraining (and kept through fine-tuning)
    ablation: bool = False


def _spikelm(num_steps: int, **extra) -> dict:
    return {
        "spiking": True,
        "spike_levels": "ternary",
        "num_steps": num_steps,
        "reset": "official",
        "learn_alpha": False,
        **extra,
    }


VARIANTS = {
    v.name: v
    for v in (
        Variant("ann", "real-valued (ANN)", {"spiking": False}),
        Variant("lif-bert", "LIF-BERT ({0,1} spikes)", {"spiking": True, "spike_levels": "binary", "num_steps": 4}),
        Variant("spikelm-t1", "SpikeLM", _spikelm(1)),
        Variant("spikelm-t4", "SpikeLM", _spikelm(4)),
        Variant(
            "spikelm-t4-symmetric-reset", "SpikeLM, symmetric reset", _spikelm(4, reset="symmetric"), ablation=True
        ),
        Variant("spikelm-t4-learn-alpha", "SpikeLM, alpha learned", _spikelm(4, learn_alpha=True), ablation=True),
    )
}
# what makes the rows differ, or the budget the same: not open to --set
FIXED_FIELDS = (
    "spiking",
    "spike_levels",
    "num_steps",
    "reset",
    "learn_alpha",
    "seed",
    "max_steps",
    "max_minutes",
    "corpus",
    "text_file",
)


@dataclass
class Budget:
    """Everything that makes two rows comparable; an output directory holds rows of one budget only."""

    preset: str = "tiny"
    corpus: str = "pypi"  # a named corpus or a path, as `spikelm pretrain --corpus`
    pretrain_steps: int = 200
    pretrain_overrides: dict = field(default_factory=dict)  # recipe / SpikeLMConfig fields (`--set`)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    train_samples: int = 1500  # per task: a fixed random subset of the training split
    dev_samples: int = 500  # per dev split
    epochs: int = 3
    learning_rate: float = 3e-4
    batch_size: int = 32
    max_length: int = 64  # fine-tuning and energy windows (pretraining uses the preset's)
    data_seed: int = 0  # draws the subsets (the same for every model and seed)
    energy_sequences: int = 32  # max_length-token windows of the corpus's validation split

    def identity(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def row_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def planned_rows(variants: list[str], seeds: list[int], ablation_seeds: list[int]) -> list[tuple[str, int]]:
    """The main rows first (all variants for one seed, then the next seed), then the ablations."""
    main = [(v, s) for s in seeds for v in variants if not VARIANTS[v].ablation]
    ablations = [(v, s) for s in ablation_seeds for v in variants if VARIANTS[v].ablation]
    return main + ablations


# ----------------------------------------------------------------------------------------------
# The fine-tuning data: fixed subsets of the offline suite
# ----------------------------------------------------------------------------------------------


def task_splits(task: str) -> tuple[str, tuple[str, ...]]:
    """``(layout, dev splits)`` of an offline task (the layout is the ``finetune`` task it runs as)."""
    from spikelm.evaluation.glue.offline import OFFLINE_TASKS
    from spikelm.evaluation.glue.tasks import get_task

    if task not in OFFLINE_TASKS:
        raise UserError(f"--tasks: {task!r} is not a task of the offline suite ({', '.join(OFFLINE_TASKS)})")
    layout = OFFLINE_TASKS[task].analogue
    return layout, (("dev",) if layout == "custom" else get_task(layout).dev_splits)


def _subsample_tsv(source: Path, target: Path, size: int, seed: int) -> int:
    """A random subset of ``size`` lines of a header + one-example-per-line TSV, in file order."""
    if not source.is_file():
        raise UserError(
            f"--suite: {source} is missing; build the suite with `spikelm data prepare-glue-offline --output-dir DIR`"
        )
    header, *rows = source.read_text(encoding="utf-8").splitlines()
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(size, len(rows))))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, "\n".join([header] + [rows[i] for i in keep]) + "\n")
    return len(keep)


def prepare_task_data(suite: Path, out: Path, budget: Budget) -> dict:
    """Write each task's subsets under ``out/<task>`` (train and dev splits only: no test predictions)."""
    sizes = {}
    for task in budget.tasks:
        _, dev_splits = task_splits(task)
        sizes[task] = {
            "train": _subsample_tsv(
                suite / task / "train.tsv", out / task / "train.tsv", budget.train_samples, budget.data_seed
            )
        }
        for split in dev_splits:
            sizes[task][split] = _subsample_tsv(
                suite / task / f"{split}.tsv", out / task / f"{split}.tsv", budget.dev_samples, budget.data_seed + 1
            )
    return sizes


def majority_baselines(data_dir: Path, tasks: tuple[str, ...]) -> dict:
    """Each task's dev metrics when every example gets the training subset's most frequent label."""
    from collections import Counter

    from spikelm.evaluation.glue.metrics import compute_metrics
    from spikelm.training.finetune import CustomColumns, load_task_data

    baselines = {}
    for task in tasks:
        layout, dev_splits = task_splits(task)
        data = load_task_data(layout, str(data_dir / task), need_train=True, custom=CustomColumns())
        majority = Counter(data.splits["train"].labels).most_common(1)[0][0]
        metrics, sizes = {}, {}
        for split in dev_splits:
            labels = data.splits[split].labels
            values = compute_metrics(data.task, [majority] * len(labels), labels)
            if split == "dev_mismatched":
                values = {f"{k}_mismatched": v for k, v in values.items()}
            metrics.update(values)
            sizes[split] = len(labels)
        baselines[task] = {"label": data.task.label_names[majority], "metrics": metrics, "dev_examples": sizes}
    return baselines


# ----------------------------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------------------------


def pretrain_config(budget: Budget, variant: Variant, seed: int):
    from spikelm.training.presets import apply_overrides, resolve_config

    fixed = sorted(set(budget.pretrain_overrides) & set(FIXED_FIELDS))
    if fixed:
        raise UserError(
            f"--set {', '.join(fixed)}: set by the experiment itself (the variant, the row's seed, "
            "--pretrain-steps, --corpus), not overridable"
        )
    config = resolve_config(budget.preset)
    # checkpoints a few times per run, so an interrupted row resumes its pretraining
    config.save_every = max(1, min(config.save_every, math.ceil(budget.pretrain_steps / 4)))
    apply_overrides(config, budget.pretrain_overrides, "--set")
    config.max_steps, config.corpus, config.seed = budget.pretrain_steps, budget.corpus, seed
    config.model.update(variant.model)
    config.check()
    return config


def run_pretraining_stage(budget: Budget, variant: Variant, seed: int, out: Path, log) -> dict:
    """Pretrain (or resume, or reuse a finished pretraining); returns its metrics."""
    from spikelm.training.pretrain import latest_checkpoint, run_pretraining

    if (out / "metrics.json").is_file() and (out / "model.safetensors").is_file():
        log(f"  pretraining: done before, reusing {out}")
        return json.loads((out / "metrics.json").read_text())
    resume = latest_checkpoint(out) is not None
    log(f"  pretraining: {'resuming' if resume else 'starting'} ({budget.pretrain_steps} steps)")
    result = run_pretraining(
        pretrain_config(budget, variant, seed),
        out,
        overwrite=not resume,
        resume=resume or None,
        progress=False,
        log=log,
    )
    return result.metrics


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_finetuning_stage(budget: Budget, task: str, seed: int, model_dir: Path, data_dir: Path, out: Path, log) -> dict:
    """Fine-tune on one task (or reuse a finished run); returns eval_results plus the per-epoch curve."""
    import torch

    from spikelm.training.finetune import CustomColumns, Settings, finetune

    if (out / "eval_results.json").is_file():
        log(f"  {task}: done before, reusing {out}")
        results = json.loads((out / "eval_results.json").read_text())
    else:
        layout, _ = task_splits(task)
        settings = Settings(
            learning_rate=budget.learning_rate,
            batch_size=budget.batch_size,
            epochs=budget.epochs,
            max_length=budget.max_length,
            seed=seed,
            padding="longest",
        )
        torch.manual_seed(seed)  # the new head's initial weights: the same whatever ran before in this process
        results = finetune(
            str(model_dir),
            layout,
            str(out),
            str(data_dir / task),
            settings,
            {},
            custom=CustomColumns(),
            overwrite=True,
            log=lambda *a, **k: None,
        )
    results["curve"] = read_jsonl(out / "train_log.jsonl")
    best = {k: v for k, v in results["best"].items() if k != "epoch"}
    log(
        f"  {task}: best epoch {results['best']['epoch']}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in best.items() if v is not None)
    )
    return results


def corpus_windows(corpus: str, tokenizer, count: int, max_length: int) -> list[dict]:
    """The first ``count`` full windows of ``max_length`` tokens of the corpus's validation split."""
    import torch

    from spikelm.data.corpora import load_corpus
    from spikelm.evaluation.energy_report import pack_windows

    text = "\n\n".join(load_corpus(corpus)["validation"]["text"])
    windows = pack_windows(text, tokenizer, max_length)[:count]
    if not windows:
        raise UserError(f"the validation split of corpus {corpus} holds less than one window of {max_length} tokens")
    return [{"input_ids": torch.tensor(windows[i : i + 8])} for i in range(0, len(windows), 8)]


def energy_of(model, batches) -> dict:
    """The energy summary's headline figures and per-neuron firing rates (per step)."""
    from spikelm.evaluation.energy import measure_energy

    summary = measure_energy(model, batches)
    keys = (
        "spiking",
        "num_sequences",
        "tokens_per_sequence",
        "num_steps",
        "snn_mJ_per_sequence",
        "ann_mJ_per_sequence",
        "ratio",
        "acs",
        "macs",
        "ann_macs",
        "mean_firing_rate",
        "firing_rate_per_step",
        "positive_rate_per_step",
        "negative_rate_per_step",
        "constants_pJ",
        "convention",
    )
    return {**{k: summary[k] for k in keys}, "neurons": summary["neurons"]}


def dev_energy(model_dir: Path, layout: str, data_dir: Path, budget: Budget, device) -> dict:
    """Energy and firing rate of a fine-tuned model on its task's dev examples (padding not counted)."""
    from transformers import AutoTokenizer

    from spikelm.evaluation.energy_report import padded_batches
    from spikelm.evaluation.loading import quiet_transformers
    from spikelm.models.modeling_spikelm import SpikeLMForSequenceClassification
    from spikelm.training.finetune import CustomColumns, encode, load_task_data

    with quiet_transformers():
        model = SpikeLMForSequenceClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_task_data(layout, str(data_dir), need_train=False, custom=CustomColumns(), model_name=str(model_dir))
    examples = data.splits[data.task.dev_splits[0]]
    examples = examples.subset(range(min(len(examples), budget.energy_sequences * 4)))
    model.to(device)
    features = [{k: v for k, v in f.items() if k != "labels"} for f in encode(tokenizer, examples, budget.max_length)]
    summary = energy_of(model, list(padded_batches(features, tokenizer, 32)))
    return {
        k: summary[k]
        for k in (
            "snn_mJ_per_sequence",
            "ann_mJ_per_sequence",
            "ratio",
            "mean_firing_rate",
            "tokens_per_sequence",
            "num_sequences",
        )
    }


def _recorded_budget(summary: Path):
    """The budget a previous run recorded in ``data/summary.json`` (None if none or unreadable)."""
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded.get("budget") if isinstance(recorded, dict) else None


def run_row(budget: Budget, variant: Variant, seed: int, out: Path, data_dir: Path, state, log) -> dict:
    """Pretrain, fine-tune on every task, count energy; returns the row's record (main process)."""
    from spikelm.data.tokenization import load_tokenizer
    from spikelm.evaluation.loading import quiet_transformers
    from spikelm.models.modeling_spikelm import SpikeLMForPreTraining

    started = time.perf_counter()
    row_dir = out / "runs" / row_name(variant.name, seed)
    pretrain_dir = row_dir / "pretrain"
    pretraining = run_pretraining_stage(budget, variant, seed, pretrain_dir, log)
    state.wait_for_everyone()
    if state.is_main_process:  # the final model is saved; the checkpoints were only for resuming
        shutil.rmtree(pretrain_dir / "checkpoints", ignore_errors=True)
    tasks = {}
    for task in budget.tasks:
        tasks[task] = run_finetuning_stage(budget, task, seed, pretrain_dir, data_dir, row_dir / task, log)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    with quiet_transformers():
        model = SpikeLMForPreTraining.from_pretrained(pretrain_dir).to(state.device)
    energy = energy_of(
        model,
        corpus_windows(budget.corpus, load_tokenizer(str(pretrain_dir)), budget.energy_sequences, budget.max_length),
    )
    for task in budget.tasks:
        tasks[task]["dev_energy"] = dev_energy(
            row_dir / task, task_splits(task)[0], data_dir / task, budget, state.device
        )
    return {
        "variant": variant.name,
        "label": variant.label,
        "ablation": variant.ablation,
        "seed": seed,
        "model": variant.model,
        "budget": budget.identity(),
        "pretraining": pretraining,
        "pretrain_log": read_jsonl(pretrain_dir / "train_log.jsonl"),
        "tasks": tasks,
        "energy": energy,
        "row_seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def _main_decides(state, value: bool) -> bool:
    """The main process's ``value`` on every process (their clocks and file views may differ)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def run_experiment(
    budget: Budget,
    suite: str | Path,
    output_dir: str | Path,
    variants: list[str],
    seeds: list[int],
    ablation_seeds: list[int],
    max_minutes: float | None = None,
    overwrite: bool = False,
    doc: str | Path | None = None,
    log=None,
    doc_block: str | None = None,
) -> list[Path]:
    """Run every planned row not finished yet (until ``max_minutes`` have passed), writing the report
    after each; returns the row files of the output directory. Progress lines go to ``log`` (default: this
    module's logger)."""
    import torch
    from accelerate import PartialState

    from .reproduce_report import write_report

    for task in budget.tasks:  # every file the rows read, before the output directory is created
        _, dev_splits = task_splits(task)
        for split in ("train", *dev_splits):
            if not (Path(suite) / task / f"{split}.tsv").is_file():
                raise UserError(
                    f"--suite {suite}: no {task}/{split}.tsv; build the suite with "
                    "`spikelm data prepare-glue-offline --output-dir DIR`"
                )
    for variant in variants:  # a bad preset or override fails here, before anything is written
        pretrain_config(budget, VARIANTS[variant], 0)
    state = PartialState(cpu=not torch.cuda.is_available())
    if log is None:
        log = logger.info
    if not state.is_main_process:
        log = lambda *args, **kwargs: None  # noqa: E731
    out = Path(output_dir)
    data_dir = out / "data"
    if state.is_main_process:
        summary = data_dir / "summary.json"
        previous = _recorded_budget(summary)
        # another budget, kept only with --overwrite: start afresh (a previous reproduce run's own folders only)
        stale = previous not in (None, budget.identity())
        replaces = ("runs", "rows", "data", "report") if stale else ()
        prepare_output_dir(out, COMMAND, overwrite, identity=budget.identity(), replaces=replaces)
        if stale:
            previous = None
        if previous is None:
            sizes = prepare_task_data(Path(suite), data_dir, budget)
            write_json_atomic(
                summary,
                {"budget": budget.identity(), "sizes": sizes, "majority": majority_baselines(data_dir, budget.tasks)},
            )
    state.wait_for_everyone()
    started = time.perf_counter()
    (out / "rows").mkdir(exist_ok=True)
    for variant, seed in planned_rows(variants, seeds, ablation_seeds):
        path = out / "rows" / f"{row_name(variant, seed)}.json"
        if _main_decides(state, path.is_file()):
            if json.loads(path.read_text())["budget"] != budget.identity():
                raise UserError(
                    f"{path} was run with another budget; use another --output-dir (rows of "
                    "different budgets are not comparable)"
                )
            log(f"{row_name(variant, seed)}: done before, skipped ({path})")
            continue
        if _main_decides(state, max_minutes is not None and time.perf_counter() - started > 60 * max_minutes):
            log(f"{row_name(variant, seed)}: not started, {max_minutes} minutes have passed (rerun to continue)")
            continue
        log(f"{row_name(variant, seed)}: {VARIANTS[variant].label} {VARIANTS[variant].model}")
        record = run_row(budget, VARIANTS[variant], seed, out, data_dir, state, log)
        if state.is_main_process:
            write_json_atomic(path, record)
            write_report(out, list(VARIANTS), doc, doc_block)
            log(f"{row_name(variant, seed)}: done in {record['row_seconds'] / 60:.1f} min, wrote {path}")
        state.wait_for_everyone()
    if state.is_main_process:
        write_report(out, list(VARIANTS), doc, doc_block)
    state.wait_for_everyone()
    return sorted((out / "rows").glob("*.json"))
