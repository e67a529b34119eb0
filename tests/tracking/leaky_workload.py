"""The toy workload of tests/train, plus a ``note`` option it logs from every worker, and an
exception (carrying a tracking URI with a password and a Bearer token) that it logs on the first
step: what a careless workload or library would leak."""
from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict

# COLUMNS, TASK, evaluate and make_rows are this workload's module interface, re-exported.
from tests.train.toy_workload import COLUMNS as COLUMNS
from tests.train.toy_workload import TASK as TASK
from tests.train.toy_workload import ToyNet
from tests.train.toy_workload import evaluate as evaluate
from tests.train.toy_workload import make_rows as make_rows

USES_MODEL_CONFIG = False
log = logging.getLogger("tests.leaky")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = 16
    note: str = ""
    leak: str = ""


def build_model(model_cfg, task_cfg: Config, **_):
    log.warning("worker: building the model; note: %s", task_cfg.note)
    return ToyNet(task_cfg.hidden)


_LOGGED = {"done": False}


def loss(model, batch, task_cfg):
    import torch

    if not _LOGGED["done"]:
        _LOGGED["done"] = True
        try:
            raise ConnectionError(task_cfg.leak)
        except ConnectionError:
            log.exception("worker: the tracking server refused us")
    logits = model(batch["frames"])
    return {"loss": torch.nn.functional.cross_entropy(logits, batch["label"])}
