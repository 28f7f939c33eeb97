"""The suites ``spikelm glue`` runs, and the paper's results table (SPEC section 5) from ``eval_results``.

A column per task holds its selection metric (accuracy; F1 for MRPC/QQP-like tasks, Matthews for
CoLA, Pearson for STS-B) at the best dev epoch, as the paper reports; MNLI-like tasks show
matched/mismatched accuracy. The average counts MNLI-m and MNLI-mm separately (the paper's 83.2 /
76.5 / 54.9); WNLI, absent from the paper's table, is shown but not averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

from spikelm.errors import UserError

from .offline import OFFLINE_TASKS
from .tasks import TASKS

PAPER_TASKS = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")  # the paper's column order
NOT_AVERAGED = ("wnli",)
METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "Pearson"}


@dataclass(frozen=True)
class SuiteTask:
    name: str  # as in the table
    layout: str  # the task finetune runs (a GLUE task or "custom")
    folder: str | None  # subfolder of --data-dir; None: the GLUE distribution's folder or the hub


def resolve_tasks(spec: str) -> list[SuiteTask]:
    """``glue`` (the paper's 8 tasks), ``offline`` (the offline suite) or a comma-separated list of either."""
    names = {"glue": list(PAPER_TASKS), "offline": list(OFFLINE_TASKS)}.get(spec)
    names = names or [n.strip() for n in spec.split(",") if n.strip()]
    tasks = []
    for name in names:
        if name in TASKS:
            tasks.append(SuiteTask(name, name, None))
        elif name in OFFLINE_TASKS:
            tasks.append(SuiteTask(name, OFFLINE_TASKS[name].analogue, name))
        else:
            raise UserError(
                f"--tasks: unknown task {name!r}; choose GLUE tasks ({', '.join(TASKS)}), offline tasks "
                f"({', '.join(OFFLINE_TASKS)}), 'glue' or 'offline'"
            )
    if not tasks:
        raise UserError("--tasks is empty")
    return tasks


def _metric(layout: str) -> str:
    return TASKS[layout].metric if layout in TASKS else "accuracy"


def task_scores(task: SuiteTask, results: dict | None, which: str = "best") -> list[float | None]:
    """The numbers a task contributes to the table: two for MNLI-like tasks (matched, mismatched)."""
    metrics = (results or {}).get(which) or {}
    if task.layout == "mnli":
        return [metrics.get("accuracy"), metrics.get("accuracy_mismatched")]
    return [metrics.get(_metric(task.layout))]


def average(tasks: list[SuiteTask], results: dict, which: str = "best") -> float | None:
    values = [
        v
        for t in tasks
        if t.layout not in NOT_AVERAGED and t.name not in NOT_AVERAGED
        for v in task_scores(t, results.get(t.name), which)
    ]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _cell(values: list[float | None]) -> str:
    return "/".join("n/a" if v is None else f"{100 * v:.1f}" for v in values)


def markdown_table(tasks: list[SuiteTask], results: dict[str, dict], which: str = "best") -> str:
    """Rows: variants; columns: tasks (x 100, one decimal, as the paper prints), then the average."""
    header = [
        f"{t.name} m/mm" if t.layout == "mnli" else f"{t.name} ({METRIC_NAMES[_metric(t.layout)]})" for t in tasks
    ]
    lines = ["| model | T | " + " | ".join(header) + " | avg |", "|---" * (len(tasks) + 3) + "|"]
    for variant, by_task in results.items():
        first = next((r for r in by_task.values() if r), {})
        settings = first.get("settings", {})
        steps = settings.get("num_steps") if settings.get("spiking") else "-"
        cells = [_cell(task_scores(t, by_task.get(t.name), which)) for t in tasks]
        avg = average(tasks, by_task, which)
        lines.append(f"| {variant} | {steps} | " + " | ".join(cells) + f" | {_cell([avg])} |")
    return "\n".join(lines)
