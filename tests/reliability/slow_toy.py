"""The toy workload (tests/train/toy_workload.py), slowed to ``sleep_s`` per step so faults can land
between checkpoints, and tracing every batch it trains on to ``trace_file`` (one JSON line per
micro-batch: a fingerprint of the batch) so a test can count recomputed steps and compare data order."""
from __future__ import annotations

import json
import time

import torch
from pydantic import BaseModel, ConfigDict

from tests.train import toy_workload as toy

TASK = "toy"
COLUMNS = toy.COLUMNS
USES_MODEL_CONFIG = False
build_model = toy.build_model
evaluate = toy.evaluate
make_rows = toy.make_rows


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = 16
    sleep_s: float = 0.0
    trace_file: str | None = None


def loss(model, batch, task_cfg: Config):
    if task_cfg.trace_file:
        fp = int(batch["frames"].to(torch.int64).sum())
        with open(task_cfg.trace_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fp": fp, "t": time.time()}) + "\n")
    if task_cfg.sleep_s:
        time.sleep(task_cfg.sleep_s)
    return toy.loss(model, batch, task_cfg)


def read_trace(path) -> list[int]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["fp"] for line in f if line.strip()]
    except FileNotFoundError:
        return []
