"""GLUE metrics from scikit-learn and scipy, as fractions in [0, 1] (``evaluate.load`` needs the hub)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .tasks import GlueTask


def _number(value) -> float | None:
    """A JSON-safe float: None where the metric is undefined (e.g. a correlation of constant predictions)."""
    value = float(value)
    return None if math.isnan(value) else value


def compute_metrics(task: GlueTask, predictions, labels) -> dict[str, float | None]:
    """The metrics GLUE reports for ``task``: predictions are class ids (or floats for a regression)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task.is_regression:
        if len(labels) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
            return {"pearson": None, "spearmanr": None}
        return {
            "pearson": _number(pearsonr(predictions, labels)[0]),
            "spearmanr": _number(spearmanr(predictions, labels)[0]),
        }
    if task.name == "cola":
        return {"matthews_correlation": _number(matthews_corrcoef(labels, predictions))}
    metrics = {"accuracy": _number(accuracy_score(labels, predictions))}
    if task.name in ("mrpc", "qqp"):
        metrics["f1"] = _number(f1_score(labels, predictions, pos_label=1, zero_division=0))
    elif task.name == "custom":  # several classes: the unweighted mean of per-class F1
        metrics["f1"] = _number(f1_score(labels, predictions, average="macro", zero_division=0))
    return metrics


def selection_value(task: GlueTask, metrics: dict) -> float:
    """The value that picks the best epoch (higher is better; an undefined metric ranks last)."""
    value = metrics.get(task.metric)
    return -math.inf if value is None else value
