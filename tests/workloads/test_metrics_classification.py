"""Classification and GLUE metrics, checked against hand-worked values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workloads.metrics.classification import accuracy, f1_binary, glue_metrics, topk_accuracy


def test_accuracy_hand_worked_and_accepts_lists_and_numpy():
    assert accuracy([0, 1, 2, 1], [0, 1, 1, 1]) == 75.0
    assert accuracy(np.array([3]), torch.tensor([3])) == 100.0          # one-element set


def test_topk_accuracy_hand_worked():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9],     # label 1: 2nd best
                           [0.9, 0.1, 0.2, 0.3],     # label 0: best
                           [0.4, 0.3, 0.2, 0.1]])    # label 3: last (4th)
    m = topk_accuracy(logits, [1, 0, 3], ks=(1, 2, 3, 4))
    assert m == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top3": 200 / 3, "top4": 100.0})


def test_topk_ties_are_pessimistic():
    # all classes tie: the label is not the unique best, and counts as rank C
    logits = torch.zeros(2, 3)
    assert topk_accuracy(logits, [0, 2], ks=(1, 2, 3)) == {"top1": 0.0, "top2": 0.0, "top3": 100.0}
    # a tie with one other class at the top -> rank 2
    assert topk_accuracy([[1.0, 1.0, 0.0]], [0], ks=(1, 2)) == {"top1": 0.0, "top2": 100.0}


def test_topk_k_larger_than_the_number_of_classes_counts_everything():
    assert topk_accuracy([[0.2, 0.1, 0.0]], [2], ks=(1, 5)) == {"top1": 0.0, "top5": 100.0}


def test_f1_binary_hand_worked():
    # preds 1 1 0 0 1, labels 1 0 1 0 1: TP 2, FP 1, FN 1 -> F1 = 4 / 6
    assert f1_binary([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(400 / 6)
    # same data, class 0 as positive: TP 1, FP 1, FN 1 -> 2 / 4
    assert f1_binary([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], positive=0) == pytest.approx(50.0)


def test_f1_binary_zero_division_is_zero():
    assert f1_binary([0, 0], [0, 0]) == 0.0                 # no positive prediction or label
    assert f1_binary([1, 1], [0, 0]) == 0.0                 # only false positives
    assert f1_binary([1], [1]) == 100.0


def test_glue_metrics_per_task():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 1, 0, 1]
    assert glue_metrics("SST-2", preds, labels) == {"accuracy": 60.0}
    assert glue_metrics("mrpc", preds, labels) == pytest.approx({"accuracy": 60.0, "f1": 400 / 6})
    assert set(glue_metrics("qqp", preds, labels)) == {"accuracy", "f1"}
    for task in ("rte", "mnli", "qnli"):
        assert set(glue_metrics(task, [0, 1, 2], [0, 1, 1])) == {"accuracy"}


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="unknown GLUE task 'cola'"):
        glue_metrics("cola", [0], [0])
    with pytest.raises(ValueError, match="same length"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="argmax"):
        accuracy(torch.tensor([0.3, 0.7]), [1, 1])
    with pytest.raises(ValueError, match="class ids in \\[0, 3\\)"):
        topk_accuracy(torch.zeros(1, 3), [3])
    with pytest.raises(ValueError, match="num_classes"):
        topk_accuracy(torch.zeros(2, 3), [0])
