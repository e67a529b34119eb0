"""Video QA metrics, checked against hand-worked values."""
from __future__ import annotations

import pytest
import torch

from workloads.metrics.qa import exact_match_accuracy, normalize_answer, rank_answers


def test_normalize_answer():
    assert normalize_answer("The  Dog!") == "dog"
    assert normalize_answer("  a RED-car. ") == "red car"
    assert normalize_answer("theatre") == "theatre"               # only whole-word articles go
    assert normalize_answer("篮球。") == "篮球"
    assert normalize_answer("") == ""


def test_exact_match_hand_worked():
    preds = ["Dog", "a cat", "", "two"]
    answers = ["the dog", ["kitten", "cat"], "nothing", ["three"]]
    assert exact_match_accuracy(preds, answers) == 50.0            # dog, cat hit; empty and two miss
    assert exact_match_accuracy(["x"], ["X."]) == 100.0            # one-element set
    assert exact_match_accuracy([""], [""]) == 100.0               # an empty answer matches an empty one


def test_exact_match_bad_inputs():
    with pytest.raises(ValueError, match="one entry per question"):
        exact_match_accuracy(["a"], [])
    with pytest.raises(ValueError, match="empty"):
        exact_match_accuracy([], [])
    with pytest.raises(ValueError, match="at least one acceptable answer"):
        exact_match_accuracy(["a"], [[]])


def test_rank_answers_orders_best_first_and_ties_keep_the_lower_index():
    scores = torch.tensor([[0.1, 0.7, 0.3],
                           [0.5, 0.5, 0.9],
                           [0.0, 0.0, 0.0]])
    assert rank_answers(scores).tolist() == [[1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert rank_answers([[2.0]]).tolist() == [[0]]
    with pytest.raises(ValueError, match="num_answers"):
        rank_answers(torch.zeros(2, 0))
