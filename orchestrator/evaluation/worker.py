"""The ``evaluate`` verb's worker function: the checkpoint loaded into the workload's model on
this worker's device, its shard of the split evaluated; rank 0 reports the metrics with the
predictions as a checkpoint file."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from orchestrator.config import RunSpec
from orchestrator.data.streams import VAL
from orchestrator.evaluation.plan import EvalPlan
from orchestrator.evaluation.shard import run_on_shard, worker_comm
from orchestrator.runtime.model_setup import WorkerModel, load_weights_into, setup_model
from orchestrator.runtime.ray_train import plan_from

log = logging.getLogger(__name__)


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function of the ``evaluate`` verb (``config``: ``{"plan": EvalPlan}``)."""
    import ray.train
    import ray.train.torch

    plan = plan_from(config, EvalPlan)
    device = ray.train.torch.get_device()
    model = setup_model(plan.run, plan.model_config, device)
    _load_evaluated_weights(model, plan.checkpoint_uri, plan.run)
    model.module.to(device).eval()
    comm = worker_comm()
    metrics, rows = run_on_shard(model, plan.run, ray.train.get_dataset_shard(VAL), plan.tracker_name, comm)
    if comm.rank == 0:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "predictions.json"), "w", encoding="utf-8") as f:
                json.dump(rows, f, default=str)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def _load_evaluated_weights(model: WorkerModel, uri: str, run: RunSpec) -> None:
    """The evaluated checkpoint's weights into the model: at least one of its weights must be there."""
    report = load_weights_into(model, uri, run)
    n_own = len(model.module.state_dict())
    if len(report["missing"]) >= n_own:
        raise ValueError(f"{uri}: none of the model's {n_own} weights are in the checkpoint")
    if report["missing"]:
        log.warning("%d weights not in the checkpoint (left as initialised): %s", len(report["missing"]),
                    ", ".join(report["missing"][:10]))
