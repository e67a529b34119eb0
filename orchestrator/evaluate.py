"""``run_evaluation(cfg, checkpoint)``: a workload's evaluation of a checkpoint, tracked in MLflow.

The checkpoint is an exported model, a DeepSpeed checkpoint URI, or ``mlflow:<run_id>`` of a
training run.  On a pre-trained checkpoint with no fine-tuning this is the zero-shot evaluation.
The metrics and a table of predictions go to an MLflow run that records the evaluated run as its
source (lineage tags).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator

import torch

from orchestrator.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalOutcome:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    mlflow_run_id: str | None
    checkpoint_uri: str


def _with_constants(batches, constants: dict[str, torch.Tensor], device) -> Iterator[dict]:
    for b in batches:
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        b.update(constants)
        yield b


def load_model_for_eval(cfg: RunConfig, checkpoint_uri: str, tokenizer, device):
    """Build the workload's model (its Table 2 modules) and load the checkpoint's weights into it."""
    from orchestrator.train.checkpoint import load_weights  # noqa: PLC0415
    from orchestrator.train.model_setup import model_config_for  # noqa: PLC0415
    from workloads import get_workload  # noqa: PLC0415

    workload = get_workload(cfg.workload)
    task_cfg = workload.Config.model_validate(cfg.task)
    model = workload.build_model(model_config_for(cfg, tokenizer), task_cfg)
    report = load_weights(model, checkpoint_uri, cfg.train.init_allow_mismatch, tokenizer, cfg.train.init_allow_new_vocab)
    n_own = len(model.state_dict())
    if len(report["missing"]) >= n_own:
        raise ValueError(f"{checkpoint_uri}: none of the model's {n_own} weights are in the checkpoint")
    if report["missing"]:
        log.warning("%d weights not in the checkpoint (left as initialised): %s", len(report["missing"]),
                    ", ".join(report["missing"][:10]))
    return workload, task_cfg, model.to(device).eval()


def run_evaluation(cfg: RunConfig, checkpoint: str, split: str = "val", track: bool = True) -> EvalOutcome:
    from orchestrator.data.pipeline import build_dataset, iter_worker_batches  # noqa: PLC0415
    from orchestrator.ray_env import ensure_ray  # noqa: PLC0415
    from orchestrator.tracking import mlflow_run  # noqa: PLC0415
    from orchestrator.train.checkpoint import resolve_init_from  # noqa: PLC0415
    from orchestrator.train.model_setup import load_run_tokenizer  # noqa: PLC0415

    tracking_uri = mlflow_run.resolve_tracking_uri(cfg.tracking.uri) if (track and cfg.tracking.enabled) else None
    try:
        uri, source_run = resolve_init_from(checkpoint, tracking_uri or mlflow_run.resolve_tracking_uri(cfg.tracking.uri))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu")
    tokenizer = load_run_tokenizer(cfg)
    workload, task_cfg, model = load_model_for_eval(cfg, uri, tokenizer, device)
    constants = {}
    if hasattr(workload, "batch_constants"):
        constants = {k: v.to(device) for k, v in workload.batch_constants(tokenizer, task_cfg).items()}

    ensure_ray()
    run_name = f"eval-{cfg.name or cfg.workload}"
    ds = build_dataset(cfg.data, split, training=False, columns=workload.COLUMNS, seed=cfg.seed, run_name=run_name)
    if cfg.eval.max_samples:
        ds = ds.limit(cfg.eval.max_samples)
    batches = iter_worker_batches(ds, batch_size=cfg.eval.batch_size, device="cpu",
                                  prefetch_batches=cfg.data.prefetch_batches, drop_last=False)
    with torch.no_grad():
        result = workload.evaluate(model, _with_constants(batches, constants, device), task_cfg, tokenizer=tokenizer)
    metrics, predictions = result if isinstance(result, tuple) else (result, [])
    metrics = {k: float(v) for k, v in metrics.items()}

    run_id = None
    if tracking_uri:
        tags = {"mplug2.workload": cfg.workload, "mplug2.evaluated_checkpoint": uri, "mplug2.split": split,
                "mplug2.kind": "evaluation", "mplug2.git_commit": mlflow_run.git_commit()}
        if source_run:
            tags["mplug2.source_run"] = source_run
        run_id = mlflow_run.open_run(tracking_uri, cfg.experiment_name(), f"{run_name}-{split}", cfg.to_dict(), tags,
                                     parent_run_id=cfg.tracking.parent_run_id)
        if predictions:
            mlflow_run.log_table(tracking_uri, run_id, predictions, "predictions.json")
        mlflow_run.close_run(tracking_uri, run_id, metrics={f"eval/{k}": v for k, v in metrics.items()})
    return EvalOutcome(metrics=metrics, predictions=predictions, mlflow_run_id=run_id, checkpoint_uri=uri)
