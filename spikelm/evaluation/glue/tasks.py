"""GLUE task specs and readers: the hub (``nyu-mll/glue``), GLUE-distribution TSV folders, and a user's files.

Every reader returns ``{split: Examples}`` with the split names of the GLUE distribution
(``train``, ``dev``/``dev_matched``/``dev_mismatched``, ``test``/``test_matched``/``test_mismatched``)
and class ids equal to those of ``nyu-mll/glue``, so a model trained from either source predicts the
same ids.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from spikelm.errors import UserError


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its texts and labels are, what its labels mean, how it is scored.

    ``tsv_labels[i]`` is how class id ``i`` is written in the GLUE TSV files, ``label_names[i]``
    its name (``None`` for the regression task STS-B). ``text_columns`` and ``label_column`` name
    header columns of the TSVs (CoLA's train/dev have no header: column numbers).
    """

    name: str
    folder: str  # folder of the GLUE distribution, also the stem of the submission file
    text_columns: tuple
    label_column: str | int | None
    tsv_labels: tuple[str, ...] | None
    label_names: tuple[str, ...] | None
    metric: str  # the metric that picks the best epoch
    epochs: int  # SPEC section 4
    hub_columns: tuple[str, ...]  # text columns in nyu-mll/glue
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: tuple[str, ...] = ("test",)
    header: bool = True  # do train/dev TSVs start with a header row
    id_column: str | int | None = "index"  # column holding the example id in test.tsv
    submission_labels: bool = False  # GLUE submissions write label names (NLI tasks) rather than ids

    @property
    def is_regression(self) -> bool:
        return self.tsv_labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.tsv_labels)


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        # CoLA train/dev: no header; source, label, original label, sentence. test.tsv: "index sentence".
        GlueTask(
            "cola",
            "CoLA",
            (3,),
            1,
            ("0", "1"),
            ("unacceptable", "acceptable"),
            "matthews_correlation",
            50,
            ("sentence",),
            header=False,
        ),
        GlueTask(
            "sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("negative", "positive"), "accuracy", 10, ("sentence",)
        ),
        GlueTask(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("0", "1"),
            ("not_equivalent", "equivalent"),
            "f1",
            20,
            ("sentence1", "sentence2"),
        ),
        GlueTask(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("0", "1"),
            ("not_duplicate", "duplicate"),
            "f1",
            5,
            ("question1", "question2"),
            id_column="id",
        ),
        GlueTask(
            "stsb", "STS-B", ("sentence1", "sentence2"), "score", None, None, "pearson", 20, ("sentence1", "sentence2")
        ),
        GlueTask(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            5,
            ("premise", "hypothesis"),
            dev_splits=("dev_matched", "dev_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
            submission_labels=True,
        ),
        GlueTask(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            "label",
            ("entailment", "not_entailment"),
            ("entailment", "not_entailment"),
            "accuracy",
            10,
            ("question", "sentence"),
            submission_labels=True,
        ),
        GlueTask(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("entailment", "not_entailment"),
            ("entailment", "not_entailment"),
            "accuracy",
            20,
            ("sentence1", "sentence2"),
            submission_labels=True,
        ),
        # WNLI is not in the paper's recipe: 5 epochs is our choice (it has 635 training pairs).
        GlueTask(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            ("0", "1"),
            ("not_entailment", "entailment"),
            "accuracy",
            5,
            ("sentence1", "sentence2"),
        ),
    )
}
CUSTOM_EPOCHS = 5  # our choice for a user's own task


def custom_task(text_columns: tuple[str, ...], label_column: str, label_names: tuple[str, ...] | None) -> GlueTask:
    """The spec of ``--task custom``: classification over ``label_names``, or regression if None."""
    return GlueTask(
        "custom",
        "custom",
        tuple(text_columns),
        label_column,
        label_names,
        label_names,
        "pearson" if label_names is None else "accuracy",
        CUSTOM_EPOCHS,
        tuple(text_columns),
        id_column=None,
    )


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise UserError(f"--task {name!r} is not a GLUE task; choose one of {', '.join(TASKS)} or 'custom'")
    return TASKS[name]


@dataclass
class Examples:
    """One split: ids, one or two texts per example, and labels (class ids or floats; None when unlabelled)."""

    ids: list[str]
    texts: list[tuple[str, ...]]
    labels: list | None = None
    source: str = ""  # where the split was read from, for messages

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices) -> Examples:
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return Examples([self.ids[i] for i in indices], [self.texts[i] for i in indices], labels, self.source)


@dataclass
class TaskData:
    task: GlueTask
    splits: dict[str, Examples] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# GLUE-distribution TSV folders
# ----------------------------------------------------------------------------------------------


def _read_rows(path: Path, delimiter: str = "\t", quoting: int = csv.QUOTE_NONE) -> list[list[str]]:
    # GLUE TSVs hold unescaped quotes: read them with QUOTE_NONE. MRPC's files start with a BOM.
    csv.field_size_limit(sys.maxsize)
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:  # decoded whole, so that a bad byte's offset is the file's (not a read buffer's)
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {bom + err.start})") from None
    return [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting) if row]


def _column(header: list[str], name, path: Path, what: str) -> int:
    if isinstance(name, int):
        return name
    if name not in header:
        raise UserError(
            f"{path}: no {what} column {name!r}; the header has {header}. Expected the GLUE layout of this task "
            "(see `spikelm finetune --help`), or use --task custom with --text-columns/--label-column"
        )
    return header.index(name)


def _parse_label(task: GlueTask, value: str, path: Path, line: int):
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise UserError(
                f"{path}, line {line}: label {value!r} is not a number (task {task.name} is a regression)"
            ) from None
    if value not in task.tsv_labels:
        raise UserError(
            f"{path}, line {line}: label {value!r} is not one of task {task.name}'s labels {list(task.tsv_labels)}"
        )
    return task.tsv_labels.index(value)


def read_glue_tsv(task: GlueTask, path: Path, labelled: bool) -> Examples:
    """Read one split of ``task`` from a TSV in the GLUE distribution's layout."""
    rows = _read_rows(path)
    header_row = task.header or not labelled  # CoLA's test.tsv has a header, its train/dev do not
    if header_row:
        if not rows:
            raise UserError(f"{path} is empty (expected a header row and examples)")
        header, body, first_line = rows[0], rows[1:], 2
    else:
        header, body, first_line = [], rows, 1
    if labelled:
        text_cols = [_column(header, c, path, "text") for c in task.text_columns]
        label_col = _column(header, task.label_column, path, "label")
    else:
        # unlabelled test files name their columns (CoLA's test.tsv too: "index sentence")
        names = ("sentence",) if task.name == "cola" else task.text_columns
        text_cols = [_column(header, c, path, "text") for c in names]
        label_col = None
    id_col = header.index(task.id_column) if isinstance(task.id_column, str) and task.id_column in header else None
    width = len(header) if header_row else max(text_cols + [label_col or 0]) + 1
    ids, texts, labels = [], [], []
    for n, row in enumerate(body):
        line = first_line + n
        if (header_row and len(row) != width) or len(row) < width:
            raise UserError(
                f"{path}, line {line}: {len(row)} tab-separated fields, expected {width}"
                + (f" (columns {header})" if header_row else f" (task {task.name})")
            )
        ids.append(row[id_col] if id_col is not None else str(n))
        texts.append(tuple(row[c] for c in text_cols))
        if labelled:
            labels.append(_parse_label(task, row[label_col], path, line))
    return Examples(ids, texts, labels if labelled else None, str(path))


def _task_folder(task: GlueTask, data_dir: Path) -> Path:
    """``data_dir`` itself, or its subfolder named as in the GLUE distribution (e.g. ``glue_data/SST-2``)."""
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist or is not a directory")
    if not (data_dir / "train.tsv").is_file() and (data_dir / task.folder / "train.tsv").is_file():
        return data_dir / task.folder
    return data_dir


def load_glue_folder(task: GlueTask, data_dir: str | Path, need_train: bool = True) -> TaskData:
    folder = _task_folder(task, Path(data_dir))
    data = TaskData(task)
    wanted = (("train",) if need_train else ()) + task.dev_splits
    for split in wanted:
        path = folder / f"{split}.tsv"
        if not path.is_file():
            raise UserError(
                f"--data-dir {folder} has no {split}.tsv; task {task.name} needs "
                f"{', '.join(s + '.tsv' for s in wanted)} (GLUE layout; test.tsv optional)"
            )
        data.splits[split] = read_glue_tsv(task, path, labelled=True)
    for split in task.test_splits:
        path = folder / f"{split}.tsv"
        if path.is_file():
            data.splits[split] = read_glue_tsv(task, path, labelled=False)
    return data


# ----------------------------------------------------------------------------------------------
# The hub: datasets.load_dataset("nyu-mll/glue", task)
# ----------------------------------------------------------------------------------------------

HUB_DATASET = "nyu-mll/glue"
_HUB_SPLITS = {
    "train": "train",
    "dev": "validation",
    "test": "test",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}


def examples_from_hub_split(task: GlueTask, split) -> Examples:
    """Our :class:`Examples` from a ``datasets`` split of ``nyu-mll/glue`` (labels -1 mean unlabelled)."""
    columns = [split[c] for c in task.hub_columns]
    texts = list(zip(*columns, strict=True))
    raw = split["label"]
    labels = None if all(v == -1 for v in raw) else [float(v) if task.is_regression else int(v) for v in raw]
    ids = [str(i) for i in split["idx"]] if "idx" in split.column_names else [str(i) for i in range(len(texts))]
    return Examples(ids, texts, labels, f"{HUB_DATASET}/{task.name}")


def load_glue_hub(task: GlueTask) -> TaskData:
    import datasets

    try:
        dataset = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as err:  # no network, no hub: say what to do instead
        raise UserError(
            f"could not load {HUB_DATASET}/{task.name} from the hub ({type(err).__name__}: {err}); without a hub, "
            f"pass --data-dir with the task's GLUE TSV files"
        ) from err
    data = TaskData(task)
    for ours in ("train",) + task.dev_splits + task.test_splits:
        data.splits[ours] = examples_from_hub_split(task, dataset[_HUB_SPLITS[ours]])
    return data


# ----------------------------------------------------------------------------------------------
# A user's own files: --task custom
# ----------------------------------------------------------------------------------------------

CUSTOM_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
CUSTOM_SPLITS = {"train": ("train",), "dev": ("dev", "validation"), "test": ("test",)}


def _find_split_file(data_dir: Path, split: str) -> Path | None:
    for stem in CUSTOM_SPLITS[split]:
        for suffix in CUSTOM_SUFFIXES:
            if (data_dir / f"{stem}{suffix}").is_file():
                return data_dir / f"{stem}{suffix}"
    return None


def _read_records(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        records = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}, line {n}: not a JSON object per line ({err})") from None
        return records
    if path.suffix == ".csv":
        rows = _read_rows(path, delimiter=",", quoting=csv.QUOTE_MINIMAL)
    else:
        rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path} is empty (expected a header row and examples)")
    header = rows[0]
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise UserError(f"{path}, line {n}: {len(row)} fields, expected {len(header)} (columns {header})")
    return [dict(zip(header, row, strict=False)) for row in rows[1:]]


def _custom_examples(path: Path, text_columns, label_column, labelled: bool) -> tuple[Examples, list]:
    records = _read_records(path)
    if not records:
        raise UserError(f"{path} holds no examples")
    columns = list(records[0])
    for col in text_columns:
        if col not in columns:
            raise UserError(f"{path}: no text column {col!r} (--text-columns); columns: {columns}")
    if labelled and label_column not in columns:
        raise UserError(f"{path}: no label column {label_column!r} (--label-column); columns: {columns}")
    ids = [str(r.get("index", r.get("id", n))) for n, r in enumerate(records)]
    texts = [tuple(str(r[c]) for c in text_columns) for r in records]
    raw = [r[label_column] for r in records] if labelled else []
    return Examples(ids, texts, None, str(path)), raw


def load_custom(
    data_dir: str | Path,
    text_columns: tuple[str, ...],
    label_column: str,
    regression: bool,
    label_names: tuple[str, ...] | None = None,
    need_train: bool = True,
) -> TaskData:
    """A user's train/dev(/test) files (TSV, CSV or JSON lines) with named columns.

    Classes are the sorted distinct training labels, unless ``label_names`` (a fine-tuned model's)
    fixes them; a dev label outside them is an error.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist or is not a directory")
    if not 1 <= len(text_columns) <= 2:
        raise UserError(f"--text-columns takes one or two column names, got {list(text_columns)}")
    found = {split: _find_split_file(data_dir, split) for split in CUSTOM_SPLITS}
    wanted = ("train", "dev") if need_train else ("dev",)
    for split in wanted:
        if found[split] is None:
            names = ", ".join(f"{stem}{{{','.join(CUSTOM_SUFFIXES)}}}" for stem in CUSTOM_SPLITS[split])
            raise UserError(f"--data-dir {data_dir} has no {split} file (expected one of {names})")
    splits, raw = {}, {}
    for split in wanted:
        splits[split], raw[split] = _custom_examples(found[split], text_columns, label_column, labelled=True)
    if found["test"] is not None:
        splits["test"], _ = _custom_examples(found["test"], text_columns, label_column, labelled=False)
    if regression:
        label_names = None
    elif label_names is None:
        if "train" not in raw:  # --eval-only of a model that records no labels (e.g. a pretraining checkpoint)
            raise UserError(
                "--eval-only --task custom: the model records no class labels for this task (it was not "
                "fine-tuned on it); fine-tune it first (drop --eval-only)"
            )
        label_names = tuple(sorted({str(v) for v in raw["train"]}))
        if len(label_names) < 2:
            raise UserError(f"{found['train']}: the label column {label_column!r} has fewer than 2 distinct values")
    task = custom_task(tuple(text_columns), label_column, label_names)
    for split in wanted:
        ex = splits[split]
        first_line = 1 if found[split].suffix in (".jsonl", ".json") else 2
        ex.labels = [_parse_label(task, str(v), found[split], n + first_line) for n, v in enumerate(raw[split])]
    return TaskData(task, splits)
