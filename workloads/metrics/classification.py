"""Classification and GLUE metrics: top-k accuracy, accuracy, binary F1, per-task GLUE metrics.

Inputs may be torch tensors, numpy arrays or lists.  Results are percentages (0-100).
Top-k ties are pessimistic: the true class is within the top k only if fewer than k *other*
classes score higher than or equal to it.
"""
from __future__ import annotations

from typing import Sequence

import torch

# GLUE tasks this project fine-tunes on, and the metrics each reports (MNLI matched and
# mismatched are two evaluation splits of the task "mnli"; the caller names them).
GLUE_TASKS = {"sst2": ("accuracy",), "rte": ("accuracy",), "mrpc": ("accuracy", "f1"),
              "qqp": ("accuracy", "f1"), "mnli": ("accuracy",), "qnli": ("accuracy",)}


def _labels(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.numel() == 0:
        raise ValueError(f"no examples to score: {name} is empty")
    if t.ndim != 1:
        raise ValueError(f"{name} must be one class id per example, shape [N], got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}; take argmax of logits first")
    return t.long()


def _pair(preds, labels) -> tuple[torch.Tensor, torch.Tensor]:
    p, y = _labels(preds, "preds"), _labels(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels must have the same length, got {p.numel()} and {y.numel()}")
    return p, y


def accuracy(preds, labels) -> float:
    """Percentage of ``preds [N]`` equal to ``labels [N]``."""
    p, y = _pair(preds, labels)
    return 100.0 * (p == y).double().mean().item()


def topk_accuracy(logits, labels, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": .., "top5": ..}``: percentage of rows of ``logits [N, C]`` whose label ranks
    within the top k (pessimistic ties).  A k above C counts every example (100%)."""
    x = torch.as_tensor(logits)
    y = _labels(labels, "labels").to(x.device)
    if x.ndim != 2 or x.shape[0] != y.numel():
        raise ValueError(f"logits must be [N, num_classes] with N = len(labels) = {y.numel()}, got {tuple(x.shape)}")
    if ((y < 0) | (y >= x.shape[1])).any():
        raise ValueError(f"labels must be class ids in [0, {x.shape[1]}), got min {int(y.min())} max {int(y.max())}")
    if torch.isnan(x).any():
        raise ValueError("logits contain NaN")
    true = x.gather(1, y[:, None])                                  # [N, 1]
    rank = (x >= true).sum(dim=1)                                  # [N], 1-based, counts the label itself
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        out[f"top{k}"] = 100.0 * (rank <= k).double().mean().item()
    return out


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 (percent) of the class ``positive``: 2 TP / (2 TP + FP + FN).  When there is neither a
    positive prediction nor a positive label the F1 is 0 (as scikit-learn's zero_division=0)."""
    p, y = _pair(preds, labels)
    tp = int(((p == positive) & (y == positive)).sum())
    fp = int(((p == positive) & (y != positive)).sum())
    fn = int(((p != positive) & (y == positive)).sum())
    denom = 2 * tp + fp + fn
    return 100.0 * 2 * tp / denom if denom else 0.0


def glue_metrics(task: str, preds, labels) -> dict[str, float]:
    """The GLUE metrics of ``task`` (sst2, rte, mrpc, qqp, mnli, qnli; ``SST-2`` style accepted):
    accuracy for all, plus F1 of the positive class (1) for mrpc and qqp."""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)} "
                         "(report MNLI matched and mismatched as two evaluations of 'mnli')")
    out = {"accuracy": accuracy(preds, labels)}
    if "f1" in GLUE_TASKS[key]:
        out["f1"] = f1_binary(preds, labels, positive=1)
    return out
