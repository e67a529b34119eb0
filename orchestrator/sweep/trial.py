"""One trial: a Tune function that runs a whole Ray Train fine-tune, then the dev evaluation.

Runs inside the Tune trial's actor.  The ``TorchTrainer`` gets Ray's ``TuneReportCallback``, so
every ``ray.train.report`` of rank 0 (loss, lr, step ... every ``train.log_every`` steps and at
each checkpoint, plus ``eval/<metric>`` at every validation, every ``eval.every_steps`` steps)
reaches Tune as an intermediate result that ASHA can cut on.  The sweep metric is the dev
evaluation at the end of training (run on the trial's Train workers by the loop; when the run has
no val split, or the sweep evaluates another split, an evaluation-only run on the workers), logged
to the trial's MLflow run (nested under the sweep's parent run) and reported to Tune as the last
result, with ``TRIAL_DONE_KEY`` set: a trial that ends without it was stopped early.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from orchestrator.evaluation.driver import run_evaluation
from orchestrator.sweep.spec import load_sweep
from orchestrator.tracking.mlflow_run import client
from orchestrator.trainer.driver import run_training

log = logging.getLogger(__name__)

TRIAL_DONE_KEY = "mplug2_trial_done"
STATUS_TAG = "mplug2.trial_status"
SWEEP_TAG = "mplug2.sweep"


def trial_index(trial_id: str) -> int:
    """Tune's trial ids end in the trial's index in the sweep (``3f2a1_00003`` -> 3)."""
    tail = trial_id.rsplit("_", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"unexpected Tune trial id {trial_id!r}: expected '<experiment>_<index>'")
    return int(tail)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """Deterministic per trial, so a retried or resumed trial re-opens its MLflow run and checkpoints."""
    return f"{sweep_name}-t{trial_index(trial_id):03d}"


def _tune_report_callbacks() -> dict[str, list]:
    """Train callbacks that forward every worker report of this trial's run to Tune (ASHA cuts on them)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return {"callbacks": [TuneReportCallback()]}


def dev_metrics(train_metrics: dict[str, Any]) -> dict[str, float]:
    """The validation metrics of the training run's last report (``eval/<name>`` -> ``<name>``):
    the end-of-training validation on the run's workers (``orchestrator.evaluation.validator.Validator``)."""
    return {k.removeprefix("eval/"): float(v) for k, v in train_metrics.items()
            if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _logged_in_training(train_metrics: dict[str, Any], name: str) -> bool:
    """The training loop already logged the dev metrics to the trial's MLflow run at the last step."""
    return f"eval/{name}" in train_metrics


def run_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """The Tune trainable.  ``config``: the sampled assignment {dotted key: value}; ``plan``: what
    the sweep driver decided (sweep file, parent run id, tracking URI, metric, init_from)."""
    from ray import tune

    if os.path.isdir(plan["cwd"]):
        os.chdir(plan["cwd"])  # Tune starts trials in their own folder; relative config paths are the driver's
    sweep = load_sweep(plan["sweep_file"], plan["sweep_overrides"])
    spec = sweep.spec
    run_name = trial_run_name(spec.name, tune.get_context().get_trial_id())
    assignment = dict(config)
    cfg = sweep.run_config(assignment, name=run_name)
    if plan.get("tracking_uri"):
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": plan["tracking_uri"]})})
    tags = {SWEEP_TAG: spec.name, STATUS_TAG: "running", "mplug2.kind": "sweep_trial",
            **{f"mplug2.search.{k}": str(v) for k, v in assignment.items()}}
    outcome = run_training(cfg, init_from=spec.init_from, extra_tags=tags, parent_run_id=plan.get("parent_run_id"),
                           **_tune_report_callbacks())
    step = int(outcome.metrics.get("step", cfg.train.max_steps))
    model_uri = outcome.export_uri or outcome.checkpoint_uri
    if model_uri is None:
        raise RuntimeError(f"trial {run_name}: training finished without an exported model or checkpoint")
    ev_metrics = dev_metrics(outcome.metrics) if spec.eval_split == "val" else {}
    if spec.eval_metric not in ev_metrics:  # no validation at the end of training: evaluate on workers
        ev_metrics = run_evaluation(cfg, model_uri, split=spec.eval_split, track=False).metrics
    if spec.eval_metric not in ev_metrics:
        raise ValueError(f"sweep metric {spec.metric!r}: the {cfg.workload} evaluation returned "
                         f"{sorted(ev_metrics)}; set metric to eval/<one of them>")
    if outcome.mlflow_run_id and not _logged_in_training(outcome.metrics, spec.eval_metric):
        from mlflow.entities import Metric

        c = client(outcome.tracking_uri)
        now = int(time.time() * 1000)
        c.log_batch(outcome.mlflow_run_id, metrics=[Metric(f"eval/{k}", float(v), now, step)
                                                    for k, v in ev_metrics.items()])
    if outcome.mlflow_run_id:
        client(outcome.tracking_uri).set_tag(outcome.mlflow_run_id, STATUS_TAG, "completed")
    # The last training metrics ride along: Tune checks every result for the scheduler's metric.
    last_train = {k: float(v) for k, v in outcome.metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**last_train, spec.metric: float(ev_metrics[spec.eval_metric]), "step": step, TRIAL_DONE_KEY: 1,
                 "mlflow_run_id": outcome.mlflow_run_id or "",
                 **{f"eval/{k}": float(v) for k, v in ev_metrics.items() if f"eval/{k}" != spec.metric}})
