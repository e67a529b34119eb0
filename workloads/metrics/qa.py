"""Video QA metrics: exact-match accuracy of generated answers, and ranking over a closed answer list.

Open-ended: the shared decoder generates an answer string per question (beam search, in the
workload); it is a hit when its normalised form equals the normalised form of any acceptable
answer.  Closed list: the workload scores every candidate answer per question (``scores [N, A]``)
and :func:`rank_answers` orders them; the predicted answer is ``answer_list[rank[:, 0]]``.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation and symbols removed (any script), English articles removed,
    whitespace collapsed: ``"The  Dog!"`` -> ``"dog"``."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}: {text!r}")
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_accuracy(preds: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Percentage of ``preds`` that match (after :func:`normalize_answer`) the answer of their
    question; ``answers[i]`` is one string or a list of acceptable strings."""
    if len(preds) != len(answers):
        raise ValueError(f"preds and answers must have one entry per question, got {len(preds)} and {len(answers)}")
    if not preds:
        raise ValueError("no questions to score: preds and answers are empty")
    hits = 0
    for i, (pred, gold) in enumerate(zip(preds, answers)):
        golds = [gold] if isinstance(gold, str) else list(gold)
        if not golds:
            raise ValueError(f"answers[{i}] is an empty list; each question needs at least one acceptable answer")
        hits += normalize_answer(pred) in {normalize_answer(g) for g in golds}
    return 100.0 * hits / len(preds)


def rank_answers(scores) -> torch.Tensor:
    """``scores [N, A]`` (higher = better) -> candidate indices ``[N, A]`` best first; equal scores
    keep the lower index first, so ``rank[:, 0]`` is a deterministic argmax."""
    s = torch.as_tensor(scores)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"scores must be [num_questions, num_answers] with at least one answer, got {tuple(s.shape)}")
    if torch.isnan(s).any():
        raise ValueError("answer scores contain NaN")
    return torch.sort(s, dim=1, descending=True, stable=True).indices
