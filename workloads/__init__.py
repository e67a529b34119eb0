"""Workloads: one module per task (pretrain, retrieval, videoqa, captioning, classification, glue).

A workload declares the model modules it needs (paper Table 2), the data columns it needs, a
loss returning a dict of named tensors (total under ``loss``) and an evaluation returning named
float metrics.  Workloads never import Ray or DeepSpeed.
"""
from __future__ import annotations

import importlib

NAMES = ("pretrain", "retrieval", "videoqa", "captioning", "classification", "glue")


def get_workload(name: str):
    """The workload module ``workloads.<name>`` (or a user module by dotted path); KeyError if unknown."""
    if "." in name:
        return importlib.import_module(name)
    if name not in NAMES:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(NAMES)}")
    try:
        return importlib.import_module(f"workloads.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"workloads.{name}":
            raise KeyError(f"workload {name!r} is not built yet") from None
        raise
