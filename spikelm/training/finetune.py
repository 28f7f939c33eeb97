"""Fine-tune and evaluate a SpikeLM (or the ANN baseline) on one GLUE-style task, on ``accelerate``.

With a ``teacher`` (a classifier already fine-tuned for the task, e.g. the real-valued model), the loss adds
knowledge distillation on the classifier logits: ``(1 - kd_weight) * task loss + kd_weight * KD`` with KD =
``kd_temperature^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))`` (regression: the MSE of the two
predictions). The teacher must use the student's vocabulary and have the task's number of labels.

The default recipe is the paper's (SPEC section 4): AdamW (no weight decay), lr 2e-5, constant
schedule, batch 32, max length 128, seed 42, the task's number of epochs, a dev evaluation after
every epoch. The paper reports the best dev epoch: ``eval_results.json`` holds that epoch
(``best``, chosen by the task's metric) and the last one (``last``); the saved model is the best
epoch's. Sequences are padded to ``max_length`` by default, as the authors did: alpha's
data initialisation averages |u| over padding positions too, so ``--padding longest`` (faster)
changes the statistics slightly. With ``--padding longest`` the dev and test splits are evaluated in order of
length (each batch pads to fewer tokens; the predictions are put back in file order), and ``group_by_length``
(``--group-by-length``) makes training batches of similar lengths too (``transformers``' length-grouped sampler:
shuffled every epoch, sorted inside mega-batches of 50 batches or fewer).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from spikelm.errors import UserError, loading_in_one_line
from spikelm.evaluation.glue.metrics import compute_metrics, selection_value
from spikelm.evaluation.glue.models import load_starting_point
from spikelm.evaluation.glue.tasks import (
    Examples,
    GlueTask,
    TaskData,
    get_task,
    load_custom,
    load_glue_folder,
    load_glue_hub,
)
from spikelm.evaluation.loading import load_pretrained, quiet_transformers
from spikelm.outputs import new_files_follow_umask, prepare_output_dir, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    learning_rate: float = 2e-5
    batch_size: int = 32
    epochs: int | None = None  # None: the task's epochs from SPEC section 4
    max_length: int = 128
    seed: int = 42
    max_train_samples: int | None = None
    max_eval_samples: int | None = None  # evaluate on a random subset of each dev split (quick runs)
    padding: str = "max_length"  # or "longest" (pad each batch to its longest sequence)
    kd_weight: float = 0.5  # with a teacher: the weight of the distillation term (1: distillation alone)
    kd_temperature: float = 1.0
    group_by_length: bool = False  # training batches of similar lengths (with padding "longest")

    def check(self) -> None:
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.padding not in ("max_length", "longest"):
            raise UserError(f"--padding must be 'max_length' or 'longest', got {self.padding!r}")
        if self.group_by_length and self.padding != "longest":
            raise UserError(
                "--group-by-length needs --padding longest (with padding to --max-length it changes nothing)"
            )
        if not 0 <= self.kd_weight <= 1:
            raise UserError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not self.kd_temperature > 0:
            raise UserError(f"--kd-temperature must be positive, got {self.kd_temperature}")


@dataclass
class CustomColumns:
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    regression: bool = False


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_task_data(
    task_name: str,
    data_dir: str | None,
    need_train: bool,
    custom: CustomColumns | None = None,
    model_name: str | None = None,
) -> TaskData:
    if task_name == "custom":
        custom = custom or CustomColumns()
        if data_dir is None:
            raise UserError("--task custom needs --data-dir with train/dev (and optional test) files")
        label_names = None
        if not need_train and not custom.regression:  # evaluate with the fine-tuned model's classes
            config_path = Path(model_name or "") / "config.json"
            if config_path.is_file():
                id2label = json.loads(config_path.read_text()).get("id2label", {})
                label_names = tuple(id2label[str(i)] for i in range(len(id2label))) or None
        return load_custom(
            data_dir, custom.text_columns, custom.label_column, custom.regression, label_names, need_train
        )
    task = get_task(task_name)
    return load_glue_folder(task, data_dir, need_train) if data_dir is not None else load_glue_hub(task)


def subsample(examples: Examples, size: int | None, seed: int) -> Examples:
    """A random subset of ``size`` examples (in file order), drawn by ``seed``; all of them if ``size`` is None."""
    if size is None or size >= len(examples):
        return examples
    return examples.subset(sorted(random.Random(seed).sample(range(len(examples)), size)))


def encode(tokenizer, examples: Examples, max_length: int) -> list[dict]:
    first = [t[0] for t in examples.texts]
    second = [t[1] for t in examples.texts] if examples.texts and len(examples.texts[0]) == 2 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length)
    features = [{key: enc[key][i] for key in enc.keys()} for i in range(len(examples))]
    if examples.labels is not None:
        for feature, label in zip(features, examples.labels, strict=True):
            feature["labels"] = label
    return features


class Collator:
    def __init__(self, tokenizer, padding: str, max_length: int, regression: bool):
        self.tokenizer, self.padding, self.max_length = tokenizer, padding, max_length
        self.label_dtype = torch.float32 if regression else torch.long

    def __call__(self, features: list[dict]) -> dict:
        inputs = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        batch = dict(self.tokenizer.pad(inputs, padding=self.padding, max_length=self.max_length, return_tensors="pt"))
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=self.label_dtype)
        return batch


# ----------------------------------------------------------------------------------------------
# Evaluation and output files
# ----------------------------------------------------------------------------------------------


class EvalLoader:
    """A dev/test split's batches; with ``by_length`` in order of length (fewer padding tokens per batch when
    each batch pads to its longest), ``order[j]`` being the file index of the j-th example served."""

    def __init__(self, features: list[dict], batch_size: int, collate, by_length: bool):
        self.order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"])) if by_length else None
        served = [features[i] for i in self.order] if by_length else features
        self.loader = torch.utils.data.DataLoader(served, batch_size=batch_size, collate_fn=collate)

    def in_file_order(self, values: np.ndarray) -> np.ndarray:
        if self.order is None:
            return values
        out = np.empty_like(values)
        out[np.asarray(self.order, dtype=np.int64)] = values
        return out


@torch.no_grad()
def predict(model, loader: EvalLoader, accelerator, task: GlueTask, description: str = "predict") -> np.ndarray:
    """The predictions of one split, in file order."""
    model.eval()
    out = []
    for batch in _progress(loader.loader, description, accelerator):
        batch.pop("labels", None)
        logits = model(**batch).logits
        values = logits.squeeze(-1).float() if task.is_regression else logits.argmax(-1)
        out.append(accelerator.gather_for_metrics(values).cpu())
    return loader.in_file_order(torch.cat(out).numpy() if out else np.zeros(0))


def evaluate_dev(model, loaders: dict, accelerator, data: TaskData) -> tuple[dict, dict]:
    """Metrics over the dev split(s) (MNLI: ``accuracy`` matched, ``accuracy_mismatched``) and predictions."""
    task = data.task
    metrics, predictions = {}, {}
    for split in task.dev_splits:
        predictions[split] = predict(model, loaders[split], accelerator, task, f"evaluate {split}")
        values = compute_metrics(task, predictions[split], data.splits[split].labels)
        if split == "dev_mismatched":
            values = {f"{k}_mismatched": v for k, v in values.items()}
        metrics.update(values)
    return metrics, predictions


def _label_text(task: GlueTask, value, names: bool) -> str:
    if task.is_regression:
        return repr(float(value))
    return (task.label_names if names else task.tsv_labels)[int(value)]


def write_dev_predictions(out: Path, data: TaskData, predictions: dict) -> None:
    """``<split>_predictions.tsv``: index, prediction, label, written as the task's TSV writes labels."""
    task = data.task
    for split, preds in predictions.items():
        ex = data.splits[split]
        lines = ["index\tprediction\tlabel"] + [
            f"{i}\t{_label_text(task, p, False)}\t{_label_text(task, y, False)}"
            for i, p, y in zip(ex.ids, preds, ex.labels, strict=True)
        ]
        write_text_atomic(out / f"{split}_predictions.tsv", "\n".join(lines) + "\n")


def submission_name(task: GlueTask, split: str) -> str:
    if task.name == "custom":
        return f"{split}.tsv"
    suffix = {"test_matched": "-m", "test_mismatched": "-mm"}.get(split, "")
    return f"{task.folder}{suffix}.tsv"


def write_test_predictions(out: Path, data: TaskData, predictions: dict) -> list[str]:
    """GLUE-submission files (``index<TAB>prediction``) under ``out/predictions``."""
    task = data.task
    written = []
    (out / "predictions").mkdir(exist_ok=True)
    for split, preds in predictions.items():
        if task.is_regression:  # STS-B scores lie in [0, 5]
            rows = [
                f"{i}\t{min(max(float(p), 0.0), 5.0):.3f}" for i, p in zip(data.splits[split].ids, preds, strict=True)
            ]
        else:
            names = task.submission_labels or task.name == "custom"
            rows = [
                f"{i}\t{task.label_names[int(p)] if names else int(p)}"
                for i, p in zip(data.splits[split].ids, preds, strict=True)
            ]
        path = out / "predictions" / submission_name(task, split)
        write_text_atomic(path, "\n".join(["index\tprediction"] + rows) + "\n")
        written.append(str(path))
    return written


# ----------------------------------------------------------------------------------------------
# Knowledge distillation from a fine-tuned teacher
# ----------------------------------------------------------------------------------------------


def load_teacher(path: str, task: GlueTask, student_config):
    """A sequence classifier fine-tuned for ``task`` (eval mode, frozen); refused unless its labels and
    vocabulary match the student's."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not (Path(path) / "config.json").is_file():
        raise UserError(
            f"--teacher {path}: no config.json there (expected a fine-tuned classifier written by "
            "save_pretrained, e.g. by `spikelm finetune --spiking false`)"
        )
    with loading_in_one_line(path, "--teacher"):
        config = AutoConfig.from_pretrained(path)
    heads = list(getattr(config, "architectures", None) or [])
    if not any(str(name).endswith("ForSequenceClassification") for name in heads):
        raise UserError(
            f"--teacher {path} is a {', '.join(map(str, heads)) or 'model with no architectures in its config.json'}, "
            "not a sequence classifier; the teacher must be a ...ForSequenceClassification fine-tuned for the task"
        )
    if config.num_labels != task.num_labels:
        what = "a regression (1 output)" if task.is_regression else f"{task.num_labels} labels"
        raise UserError(
            f"--teacher {path} predicts {config.num_labels} label(s), but task {task.name} has {what}; "
            "the teacher must be fine-tuned for the same task"
        )
    if config.vocab_size != student_config.vocab_size:
        raise UserError(
            f"--teacher {path} has a vocabulary of {config.vocab_size} tokens, the student "
            f"{student_config.vocab_size}; teacher and student must share the tokenizer"
        )
    names = [config.id2label.get(i, config.id2label.get(str(i))) for i in range(config.num_labels)]
    if (
        not task.is_regression
        and task.label_names
        and all(isinstance(n, str) and not n.startswith("LABEL_") for n in names)
        and names != list(task.label_names)
    ):
        raise UserError(f"--teacher {path} has labels {names}, task {task.name} {list(task.label_names)}")
    teacher = load_pretrained(AutoModelForSequenceClassification, path, "--teacher").eval()
    teacher.requires_grad_(False)
    return teacher


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, regression: bool
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the batch (mean); regression: MSE."""
    import torch.nn.functional as F

    if regression:
        return F.mse_loss(student_logits.float().squeeze(-1), teacher_logits.float().squeeze(-1))
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def training_loss(model, batch: dict, teacher, settings: Settings, regression: bool):
    """The step's loss and its distillation term (None without a teacher)."""
    outputs = model(**batch)
    if teacher is None:
        return outputs.loss, None
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    kd = kd_loss(outputs.logits, teacher_logits, settings.kd_temperature, regression)
    return (1 - settings.kd_weight) * outputs.loss + settings.kd_weight * kd, kd


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _round(metrics: dict) -> dict:
    return {k: (None if v is None else round(v, 6)) for k, v in metrics.items()}


def _describe(metrics: dict) -> str:
    return ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in metrics.items())


def finetune(
    model_name: str,
    task_name: str,
    output_dir: str,
    data_dir: str | None = None,
    settings: Settings | None = None,
    changes: dict | None = None,
    tokenizer: str | None = None,
    custom: CustomColumns | None = None,
    eval_only: bool = False,
    overwrite: bool = False,
    log=None,
    teacher: str | None = None,
) -> dict:
    """Fine-tune (or, with ``eval_only``, evaluate) ``model_name`` on a task; returns ``eval_results``.

    ``teacher``: a classifier fine-tuned for the task whose logits are distilled into the model (see above).
    Progress lines go to ``log`` (default: this module's logger; the command passes ``print``).

    The same seed, thread count and inputs give the same weights and metrics bit for bit: everything is seeded
    before the model (and its new head) is created; on CUDA also with torch's deterministic algorithms
    (:mod:`spikelm.training.reproducibility`)."""
    from .reproducibility import reproducible

    settings = settings or Settings()
    settings.check()
    with reproducible(settings.seed):
        return _finetune(
            model_name,
            task_name,
            output_dir,
            data_dir,
            settings,
            changes,
            tokenizer,
            custom,
            eval_only,
            overwrite,
            log,
            teacher,
        )


def _finetune(
    model_name,
    task_name,
    output_dir,
    data_dir,
    settings,
    changes,
    tokenizer,
    custom,
    eval_only,
    overwrite,
    log,
    teacher,
) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    data = load_task_data(task_name, data_dir, need_train=not eval_only, custom=custom, model_name=model_name)
    task = data.task
    for split in task.dev_splits:
        data.splits[split] = subsample(data.splits[split], settings.max_eval_samples, settings.seed)
    start = load_starting_point(model_name, task, changes, eval_only, tokenizer)
    positions = getattr(start.model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and settings.max_length > positions:
        raise UserError(
            f"--max-length {settings.max_length} exceeds the model's max_position_embeddings ({positions}); "
            f"pass --max-length {positions} or less"
        )
    if teacher is not None and eval_only:
        raise UserError("--teacher has no use with --eval-only (it only adds a training loss)")
    teacher_model = load_teacher(teacher, task, start.model.config) if teacher is not None else None
    out = prepare_output_dir(
        output_dir,
        "finetune",
        overwrite,
        identity={"task": task.name},
        inputs={"--model": model_name, "--teacher": teacher},
    )
    accelerator = Accelerator()
    if log is None:
        log = logger.info
    if not accelerator.is_main_process:  # one log, not one per process
        log = lambda *args, **kwargs: None  # noqa: E731
    for warning in start.warnings:
        log(f"warning: {warning}")
    log(f"{task.name}: {start.description}; tokenizer {start.tokenizer_source}")
    set_seed(settings.seed)  # training's randomness (order, dropout) whatever the starting point drew

    model, tokenizer_obj = start.model, start.tokenizer
    collate = Collator(tokenizer_obj, settings.padding, settings.max_length, task.is_regression)
    eval_splits = task.dev_splits + tuple(s for s in task.test_splits if s in data.splits)
    loaders = {
        s: EvalLoader(
            encode(tokenizer_obj, data.splits[s], settings.max_length),
            settings.batch_size,
            collate,
            by_length=settings.padding == "longest",
        )
        for s in eval_splits
    }
    train = data.splits.get("train")
    epochs = 0 if eval_only else (settings.epochs or task.epochs)
    if train is not None:
        train = subsample(train, settings.max_train_samples, settings.seed)
    optimizer = train_loader = None
    if epochs:
        features = encode(tokenizer_obj, train, settings.max_length)
        generator = torch.Generator().manual_seed(settings.seed)
        if settings.group_by_length:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            lengths = [len(f["input_ids"]) for f in features]
            order = {"sampler": LengthGroupedSampler(settings.batch_size, lengths=lengths, generator=generator)}
        else:
            order = {"shuffle": True, "generator": generator}
        train_loader = torch.utils.data.DataLoader(
            features, batch_size=settings.batch_size, collate_fn=collate, **order
        )
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate, weight_decay=0.0
        )
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        if teacher_model is not None:
            teacher_model = accelerator.prepare_model(teacher_model, evaluation_mode=True)
    else:
        model = accelerator.prepare(model)
    for loader in loaders.values():
        loader.loader = accelerator.prepare(loader.loader)

    history, best, best_state, best_predictions = [], None, None, None
    log_path = out / "train_log.jsonl"
    if epochs:
        if accelerator.is_main_process:
            log_path.write_text("")
        log(
            f"training on {len(train)} examples for {epochs} epochs, batch {settings.batch_size}, "
            f"lr {settings.learning_rate}, {accelerator.device}"
        )
    for epoch in range(1, epochs + 1):
        model.train()
        started, total, kd_total, steps = time.perf_counter(), 0.0, 0.0, 0
        progress = _progress(train_loader, f"epoch {epoch}/{epochs}", accelerator)
        for batch in progress:
            loss, kd = training_loss(model, batch, teacher_model, settings, task.is_regression)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total, steps = total + loss.item(), steps + 1
            kd_total += kd.item() if kd is not None else 0.0
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{total / steps:.4f}")
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        metrics, predictions = evaluate_dev(model, loaders, accelerator, data)
        eval_seconds = time.perf_counter() - started
        record = {
            "epoch": epoch,
            "train_loss": total / max(steps, 1),
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            **_round(metrics),
        }
        if teacher_model is not None:
            record["train_kd_loss"] = kd_total / max(steps, 1)
        history.append(record)
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        log(
            f"epoch {epoch}/{epochs}: train loss {record['train_loss']:.4f} ({train_seconds:.0f} s); dev "
            f"{_describe(metrics)} ({eval_seconds:.0f} s)"
        )
        if best is None or selection_value(task, metrics) > selection_value(task, best):
            best = {"epoch": epoch, **metrics}
            best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in accelerator.unwrap_model(model).state_dict().items()
            }
            best_predictions = predictions

    if epochs:
        accelerator.unwrap_model(model).load_state_dict(best_state)
        last = {"epoch": history[-1]["epoch"], **{k: history[-1][k] for k in best if k != "epoch"}}
    else:
        metrics, best_predictions = evaluate_dev(model, loaders, accelerator, data)
        best = last = {"epoch": None, **metrics}
    test_predictions = {
        s: predict(model, loaders[s], accelerator, task, f"predict {s}")
        for s in eval_splits
        if s not in task.dev_splits
    }

    unwrapped = accelerator.unwrap_model(model)
    config = unwrapped.config
    results = {
        "task": task.name,
        "best": _round(best),
        "last": _round(last),
        "settings": {
            **asdict(settings),
            "epochs": epochs,
            "eval_only": eval_only,
            "model": model_name,
            "teacher": teacher,
            "initialised_from": start.description,
            "tokenizer": start.tokenizer_source,
            "data": data.splits[task.dev_splits[0]].source,
            "train_examples": None if train is None or not epochs else len(train),
            "dev_examples": {s: len(data.splits[s]) for s in task.dev_splits},
            "optimizer": "AdamW, weight decay 0, constant learning rate",
            "selection_metric": task.metric,
            "spiking": config.spiking,
            "num_steps": config.effective_num_steps,
            "spike_levels": config.spike_levels if config.spiking else None,
            "warnings": start.warnings,
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "threads": torch.get_num_threads(),  # float sums depend on it (spikelm.training.reproducibility)
            "seconds_per_epoch": (
                round(sum(h["train_seconds"] for h in history) / len(history), 2) if history else None
            ),
        },
    }
    if accelerator.is_main_process:
        write_dev_predictions(out, data, best_predictions)
        written = write_test_predictions(out, data, test_predictions)
        if epochs:
            with quiet_transformers(), new_files_follow_umask(out):  # safetensors writes 0600
                unwrapped.save_pretrained(out)
            tokenizer_obj.save_pretrained(out)
        write_json_atomic(out / "eval_results.json", results)
        which = "dev" if eval_only else f"best epoch {best['epoch']} of {epochs} (the paper's choice)"
        log(f"{task.name} {which}: {_describe({k: v for k, v in best.items() if k != 'epoch'})}")
        if epochs and best["epoch"] != epochs:
            log(f"{task.name} last epoch {epochs}: {_describe({k: v for k, v in last.items() if k != 'epoch'})}")
        log(
            f"wrote {out / 'eval_results.json'}"
            + (", the best epoch's model" if epochs else "")
            + (f" and {len(written)} test prediction file(s)" if written else "")
        )
    accelerator.wait_for_everyone()
    return results


def _progress(loader, description: str, accelerator):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs); never on other processes
    return tqdm(loader, desc=description, leave=False, disable=None if accelerator.is_local_main_process else True)
