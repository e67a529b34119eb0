"""``run_evaluation(cfg, checkpoint)``: a workload's evaluation of a checkpoint, tracked in MLflow.

The checkpoint is an exported model, a DeepSpeed checkpoint URI, or ``mlflow:<run_id>`` of a
training run.  On a pre-trained checkpoint with no fine-tuning this is the zero-shot evaluation.
The model runs on the run's Ray Train workers (``train.num_workers`` x ``train.use_gpu``,
``train.cpus_per_worker`` / ``gpus_per_worker``), each evaluating a shard of the split
(:mod:`orchestrator.evaluation.shard`); this process only builds the dataset plan and collects the
metrics.  The metrics (with ``items``, ``bad_items``, ``item_coverage``: how many items they cover)
and a table of predictions go to an MLflow run that records the evaluated run as its source
(lineage tags).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

from orchestrator import storage
from orchestrator.config import ConfigError, RunSpec, check_inputs
from orchestrator.data import quality
from orchestrator.data.streams import VAL
from orchestrator.evaluation.data import build_eval_dataset
from orchestrator.evaluation.plan import EvalPlan
from orchestrator.evaluation.worker import eval_loop_per_worker
from orchestrator.ray_env import ensure_ray
from orchestrator.runtime.model_setup import driver_model_config
from orchestrator.runtime.ray_train import build_trainer
from orchestrator.tracking import mlflow_run
from orchestrator.tracking.tags import evaluation_tags
from orchestrator.train.weights import resolve_init_from
from workloads.base import load_workload

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalOutcome:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    mlflow_run_id: str | None
    checkpoint_uri: str


def run_evaluation(cfg: RunSpec, checkpoint: str, split: str = VAL, track: bool = True) -> EvalOutcome:
    """Evaluate ``checkpoint`` on ``split`` with an evaluation-only ``TorchTrainer`` on the run's
    workers; the metrics equal those of one worker for any ``train.num_workers``."""
    check_inputs(cfg)  # data.root is there: one clear line otherwise, before anything starts
    tracking_uri = mlflow_run.resolve_tracking_uri(cfg.tracking.uri) if (track and cfg.tracking.enabled) else None
    try:
        uri, source_run = resolve_init_from(checkpoint, tracking_uri or mlflow_run.resolve_tracking_uri(cfg.tracking.uri))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    workload = load_workload(cfg.workload)
    model_config = driver_model_config(cfg, workload)  # a config, no weights

    ensure_ray()
    run_name = f"eval-{cfg.name or cfg.workload}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tracker = f"{run_name}-{split}-{stamp}"
    ds = build_eval_dataset(cfg, workload.COLUMNS, split, tracker)
    if ds is None:
        raise ConfigError(f"no data source has a {split!r} split to evaluate on (data.sources[].{split})")

    plan = EvalPlan(run=cfg, checkpoint_uri=uri, model_config=model_config, tracker_name=tracker)
    trainer = build_trainer(eval_loop_per_worker, plan, tracker, {VAL: ds})
    try:
        result = trainer.fit()
    finally:
        quality.release(tracker)  # the pass is over; its counts are in the workers' metrics (bad_items)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    predictions: list[dict[str, Any]] = []
    if result.checkpoint is not None:
        with storage.local_folder(storage.checkpoint_uri(result.checkpoint)) as d:
            path = os.path.join(d, "predictions.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    predictions = json.load(f)
    partial = _partial_note(cfg, metrics)
    if partial:
        log.warning("the metrics are not over the whole %s split: %s", split, partial)

    run_id = None
    if tracking_uri:
        tags = evaluation_tags(cfg.workload, uri, split, cfg.train.num_workers, cfg.train.use_gpu, partial, source_run)
        run_id = mlflow_run.open_run(tracking_uri, cfg.experiment_name(), f"{run_name}-{split}", cfg.to_dict(), tags,
                                     parent_run_id=cfg.tracking.parent_run_id)
        if predictions:
            mlflow_run.log_table(tracking_uri, run_id, predictions, "predictions.json")
        mlflow_run.close_run(tracking_uri, run_id, metrics={f"eval/{k}": v for k, v in metrics.items()})
    return EvalOutcome(metrics=metrics, predictions=predictions, mlflow_run_id=run_id, checkpoint_uri=uri)


def _partial_note(cfg: RunSpec, metrics: dict[str, float]) -> str | None:
    """Why the metrics cover fewer items than the split, or None when they cover all of it."""
    notes = []
    if metrics.get("bad_items"):
        notes.append(f"{int(metrics['bad_items'])} bad items skipped (item_coverage={metrics.get('item_coverage', 0):.4f})")
    if cfg.eval.max_samples and metrics.get("items", 0) >= cfg.eval.max_samples:
        notes.append(f"eval.max_samples={cfg.eval.max_samples} rows only")
    return "; ".join(notes) or None
