"""GLUE metrics, computed with scikit-learn and scipy.

Values follow the GLUE convention: fractions, not percentages (accuracy and F1 in 0..1, correlations in -1..1).
Where GLUE scores a task by two metrics (MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman), their unweighted
mean is the task's main metric, as in the GLUE leaderboard's task score.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

from pad_moe.data.task_info import METRIC_KINDS, TaskInfo

MAIN_METRIC_BY_KIND = {
    "accuracy": "accuracy",
    "matthews": "matthews_correlation",
    "f1_accuracy": "f1_accuracy_mean",
    "pearson_spearman": "pearson_spearman_mean",
}


def _metric_kind(task: str | TaskInfo) -> str:
    if isinstance(task, TaskInfo):
        return task.metric
    if task in METRIC_KINDS:
        return task
    from pad_moe.data.tasks import task_info  # lazy: the task tables import this module

    return task_info(task).metric


def main_metric(task: str | TaskInfo) -> str:
    """Name of the metric that ranks runs of ``task`` (higher is better)."""
    return MAIN_METRIC_BY_KIND[_metric_kind(task)]


def _as_numpy(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().float().numpy() if values.is_floating_point() else values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 0:
        raise ValueError(f"{name} must be a sequence, got a scalar")
    return array


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson/Spearman; NaN (not a warning) when either side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(fn(predictions, labels)[0])


def compute_metrics(task: str | TaskInfo, predictions, labels) -> dict[str, float]:
    """GLUE metrics of ``task`` (a task name, a TaskInfo or a metric kind).

    predictions: class ids, or logits of shape (n, num_labels) (argmax is taken); regression: scores, shape (n,) or
    (n, 1). labels: gold class ids or scores. Accepts lists, numpy arrays or torch tensors.
    """
    kind = _metric_kind(task)
    preds, gold = _as_numpy(predictions, "predictions"), _as_numpy(labels, "labels")
    if kind == "pearson_spearman":
        preds = preds[:, 0] if preds.ndim == 2 and preds.shape[1] == 1 else preds
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.ndim != 1 or gold.ndim != 1 or len(preds) != len(gold):
        raise ValueError(f"predictions of shape {preds.shape} do not match labels of shape {gold.shape}")
    if len(gold) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if kind == "pearson_spearman":
        preds, gold = preds.astype(np.float64), gold.astype(np.float64)
        pearson = _correlation(stats.pearsonr, preds, gold)
        spearman = _correlation(stats.spearmanr, preds, gold)
        return {"pearson": pearson, "spearman": spearman, "pearson_spearman_mean": (pearson + spearman) / 2,
                "mse": float(mean_squared_error(gold, preds))}
    preds, gold = preds.astype(np.int64), gold.astype(np.int64)
    out = {"accuracy": float(accuracy_score(gold, preds))}
    if kind == "matthews":
        out["matthews_correlation"] = float(matthews_corrcoef(gold, preds))
    elif kind == "f1_accuracy":
        out["f1"] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0))
        out["f1_accuracy_mean"] = (out["f1"] + out["accuracy"]) / 2
    return out
