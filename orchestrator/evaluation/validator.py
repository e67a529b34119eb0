"""Validation during training: the ``val`` shard evaluated on every worker with the model the
engine holds, when the step schedule says so (:class:`~orchestrator.train.schedule.StepSchedule`)."""
from __future__ import annotations

from orchestrator.config import RunSpec
from orchestrator.data.streams import VAL
from orchestrator.evaluation.shard import full_parameters, run_on_shard
from orchestrator.runtime.model_setup import WorkerModel


class Validator:
    """Validation during training: ``run(engine)`` evaluates the ``val`` shard on every worker and
    returns ``{"eval/<metric>": value}`` (identical on every rank).  When it runs is the step
    schedule's decision (:class:`~orchestrator.train.schedule.StepSchedule`)."""

    def __init__(self, run: RunSpec, model: WorkerModel, tracker_name: str | None = None):
        self.run_cfg, self.model, self.tracker_name = run, model, tracker_name

    def run(self, engine) -> dict[str, float]:
        import ray.train

        module, m = engine.module, self.model
        with full_parameters(module, self.run_cfg.train.zero_stage):
            metrics, _ = run_on_shard(m.workload, module, m.task_cfg, self.run_cfg,
                                      shard=ray.train.get_dataset_shard(VAL), device=m.device,
                                      constants=m.constants, tokenizer=m.tokenizer, tracker_name=self.tracker_name)
        return {f"eval/{k}": v for k, v in metrics.items()}
