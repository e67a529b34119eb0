"""Validation during training: the ``val`` shard evaluated on every worker with the model the
engine holds, when the step schedule says so (:class:`~orchestrator.train.schedule.StepSchedule`)."""
from __future__ import annotations

from orchestrator.config import RunSpec
from orchestrator.data.streams import VAL
from orchestrator.evaluation.shard import full_parameters, run_on_shard
from orchestrator.runtime.model_setup import WorkerModel


class Validator:
    """Validation during training: ``run()`` evaluates the ``val`` shard on every worker and
    returns ``{"eval/<metric>": value}`` (identical on every rank).  When it runs is the step
    schedule's decision (:class:`~orchestrator.train.schedule.StepSchedule`)."""

    def __init__(self, run: RunSpec, model: WorkerModel, tracker_name: str | None = None):
        self.run_cfg, self.model, self.tracker_name = run, model, tracker_name

    def run(self) -> dict[str, float]:
        """The metrics of the model as it is now (the engine trains ``model.module`` in place)."""
        import ray.train

        with full_parameters(self.model.module, self.run_cfg.train.zero_stage):
            metrics, _ = run_on_shard(self.model, self.run_cfg, ray.train.get_dataset_shard(VAL), self.tracker_name)
        return {f"eval/{k}": v for k, v in metrics.items()}
