"""The driver's decisions for one evaluation, handed to every evaluating worker.

:class:`EvalPlan` is the only thing an evaluation worker receives (``TorchTrainer(train_loop_config=
{"plan": plan})``, :mod:`orchestrator.runtime.ray_train`).  Frozen: a worker reads it, never changes it.
"""
from __future__ import annotations

from dataclasses import dataclass

from model import MPlugConfig
from orchestrator.config import RunSpec


@dataclass(frozen=True)
class EvalPlan:
    run: RunSpec                        # the run config of the evaluation
    checkpoint_uri: str                 # the evaluated weights (an export or a DeepSpeed checkpoint)
    model_config: MPlugConfig | None    # None: the workload builds its model itself (USES_MODEL_CONFIG = False)
    tracker_name: str                   # the bad-clip tracker of this evaluation pass
