"""GLUE metrics against hand-checked values (and scipy's / scikit-learn's documented examples)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pad_moe.data import compute_metrics, main_metric, task_names


def test_accuracy_is_a_fraction():
    assert compute_metrics("sst2", [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75}


def test_matthews_correlation_hand_checked():
    # TP=2 TN=0 FP=1 FN=1: (2*0 - 1*1) / sqrt(3*3*1*1) = -1/3 (scikit-learn's documented example, with 0/1 labels)
    out = compute_metrics("cola", [1, 0, 1, 1], [1, 1, 1, 0])
    assert out["matthews_correlation"] == pytest.approx(-1 / 3)
    assert compute_metrics("cola", [0, 1, 0, 1], [0, 1, 0, 1])["matthews_correlation"] == pytest.approx(1.0)
    assert compute_metrics("cola", [1, 1, 1, 1], [0, 1, 0, 1])["matthews_correlation"] == 0.0  # constant prediction


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy_hand_checked(task):
    # TP=3 FP=0 FN=1 TN=2: precision 1, recall 3/4, F1 = 6/7; accuracy 5/6
    out = compute_metrics(task, [0, 1, 0, 0, 1, 1], [0, 1, 1, 0, 1, 1])
    assert out["f1"] == pytest.approx(6 / 7)
    assert out["accuracy"] == pytest.approx(5 / 6)
    assert out["f1_accuracy_mean"] == pytest.approx((6 / 7 + 5 / 6) / 2)
    assert compute_metrics(task, [0, 0, 0], [1, 0, 1])["f1"] == 0.0  # no positive prediction: 0, not a warning


def test_pearson_and_spearman_hand_checked():
    # x = 1..5, y = 5 6 7 8 7: Pearson 6/sqrt(52); Spearman on ranks (1 2 3.5 5 3.5) = 8/sqrt(95) (scipy's example)
    out = compute_metrics("stsb", [1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert out["pearson"] == pytest.approx(6 / math.sqrt(52))
    assert out["spearman"] == pytest.approx(8 / math.sqrt(95))
    assert out["spearman"] == pytest.approx(0.8207826816681233)
    assert out["pearson_spearman_mean"] == pytest.approx((6 / math.sqrt(52) + 8 / math.sqrt(95)) / 2)
    assert out["mse"] == pytest.approx(np.mean((np.arange(1, 6) - np.array([5, 6, 7, 8, 7])) ** 2))


def test_regression_accepts_column_tensors_and_constant_predictions_give_nan_quietly():
    out = compute_metrics("vader-movies-reg", torch.tensor([[0.1], [0.2], [0.4]]), torch.tensor([1.0, 2.0, 4.0]))
    assert out["pearson"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(compute_metrics("stsb", [1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["pearson"])


def test_logits_are_argmaxed_and_tensors_accepted():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 0.5]])
    assert compute_metrics("rte", logits, torch.tensor([0, 1, 1]))["accuracy"] == pytest.approx(2 / 3)
    assert compute_metrics("mnli", np.eye(3), [0, 1, 2])["accuracy"] == 1.0


def test_main_metric_of_every_task():
    expected = {"cola": "matthews_correlation", "stsb": "pearson_spearman_mean", "mrpc": "f1_accuracy_mean",
                "qqp": "f1_accuracy_mean", "sst2": "accuracy", "mnli": "accuracy", "qnli": "accuracy",
                "rte": "accuracy", "vader-movies": "accuracy", "vader-movies-reg": "pearson_spearman_mean"}
    for task, name in expected.items():
        assert main_metric(task) == name
    for task in task_names():  # every registered task's main metric is among the values it computes
        preds = [0.5, 1.5, 1.0] if main_metric(task) == "pearson_spearman_mean" else [0, 1, 0]
        assert main_metric(task) in compute_metrics(task, preds, [0, 1, 1])


def test_bad_input_is_one_line():
    for call, match in [(lambda: compute_metrics("sst2", [0, 1], [0, 1, 1]), "do not match"),
                        (lambda: compute_metrics("nope", [0], [0]), "unknown task 'nope'; allowed: cola"),
                        (lambda: compute_metrics("sst2", [], []), "zero examples")]:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
