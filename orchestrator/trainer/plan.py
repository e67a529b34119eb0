"""The driver's decisions for one training run, handed to every Ray Train worker.

:class:`WorkerPlan` is the only thing a worker receives (``TorchTrainer(train_loop_config=
{"plan": plan})``, :mod:`orchestrator.runtime.ray_train`); nothing is captured from the driver's
globals.  Frozen: a worker reads it, never changes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model import MPlugConfig
from orchestrator.config import RunSpec
from orchestrator.train.lease import LeaseFence


@dataclass(frozen=True)
class WorkerPlan:
    run: RunSpec                        # the resolved run config, local paths made absolute
    run_name: str
    run_dir: str                        # <storage>/<experiment>/<run name>: checkpoints must lie under it
    model_config: MPlugConfig | None    # None: the workload builds its model itself (USES_MODEL_CONFIG = False)
    export_uri: str | None = None       # where rank 0 writes the consolidated model at the end
    init_from: str | None = None        # weights to start from (an export or a DeepSpeed checkpoint URI)
    deepspeed_user: dict[str, Any] | None = None  # the user's DeepSpeed JSON (train.deepspeed_config), read
    mlflow_run_id: str | None = None    # rank 0 logs metrics to this run (None: tracking off)
    tracking_uri: str | None = None
    stream_fractions: dict[str, float] = field(default_factory=dict)  # mixed-in stream -> share of batches
    validate: bool = False              # a ``val`` dataset is attached: validate (eval.every_steps, at the end)
    val_tracker: str | None = None      # bad-clip tracker of the validation passes
    lease_fence: LeaseFence | None = None  # the run folder's lease generation: checked before every write
