"""A toy workload over real pipeline rows (frames + clip_index) that traces, per trained
micro-batch, the worker's pid and the clip ids it trained on (one JSON line each), slowed to
``sleep_s`` per step so a fault can land mid-epoch; ``fail_setup`` makes every worker's setup
fail with a missing file (the fail-fast test), counted in ``trace_file``."""
from __future__ import annotations

import json
import os
import time

import torch
from pydantic import BaseModel, ConfigDict

from tests.train import toy_workload as toy

TASK = "toy"
COLUMNS = ("frames", "clip_index")
USES_MODEL_CONFIG = False


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = 16
    sleep_s: float = 0.0
    trace_file: str | None = None
    fail_setup: bool = False


def build_model(model_cfg, task_cfg: Config, **_):
    if task_cfg.fail_setup:
        with open(task_cfg.trace_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"setup": os.getpid()}) + "\n")
        raise FileNotFoundError("init weights not found: /nowhere/weights.safetensors")
    return toy.ToyNet(task_cfg.hidden)


def loss(model, batch, task_cfg: Config):
    if task_cfg.trace_file:
        with open(task_cfg.trace_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "ids": batch["clip_index"].tolist(), "t": time.time()}) + "\n")
    if task_cfg.sleep_s:
        time.sleep(task_cfg.sleep_s)
    logits = model(batch["frames"])
    return {"loss": torch.nn.functional.cross_entropy(logits, batch["clip_index"] % 2)}


def evaluate(model, batches, task_cfg: Config, tokenizer=None):
    """The validation the loop runs at the end of training: the parity of the clip id (its label here)."""
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            correct += int((model(b["frames"]).argmax(-1) == b["clip_index"] % 2).sum())
            total += len(b["clip_index"])
    return {"accuracy": correct / max(total, 1)}


def read(path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
