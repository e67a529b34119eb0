"""The one ``TorchTrainer`` builder of training and evaluation runs.

A run hands its workers one frozen, typed plan (:class:`~orchestrator.trainer.plan.WorkerPlan`,
:class:`~orchestrator.evaluation.plan.EvalPlan`) as Ray Train's ``train_loop_config``
(:func:`loop_config`, read back on the worker by :func:`plan_from`): nothing is captured from the
driver's globals.  The datasets are split across the workers by :func:`sharded_data_config`:
the ``val`` split into uneven shards that hold every row once, the training streams as Ray Train
splits them.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Protocol, TypeVar

from orchestrator import storage
from orchestrator.config import RunSpec
from orchestrator.console import train_logging_config
from orchestrator.data.streams import VAL

PLAN_KEY = "plan"  # the plan's key in Ray Train's train_loop_config
P = TypeVar("P")


class RunPlan(Protocol):
    """A run's frozen plan for its workers (``WorkerPlan``, ``EvalPlan``): the run config and more."""

    run: RunSpec


def loop_config(plan: Any) -> dict[str, Any]:
    return {PLAN_KEY: plan}


def plan_from(config: dict[str, Any], kind: type[P]) -> P:
    """The plan a worker received (``train_loop_config``), checked to be a ``kind``."""
    plan = config[PLAN_KEY]
    if not isinstance(plan, kind):
        raise TypeError(f"train_loop_config[{PLAN_KEY!r}] must be a {kind.__name__}, got {type(plan).__name__}")
    return plan


def build_trainer(worker_fn: Callable[[dict], None], plan: RunPlan, name: str, datasets: dict, *,
                  training: bool = False, callbacks: list | None = None, worker_env: dict[str, str] | None = None,
                  deterministic: bool = False):
    """The ``TorchTrainer`` running ``worker_fn`` on ``train.num_workers`` workers (``train.use_gpu``,
    ``train.cpus_per_worker`` / ``gpus_per_worker`` of ``plan.run``), each given ``plan``; Ray
    Train's run ``name`` lives under ``<storage>/<experiment>/``.  ``training``: keep ``train.keep_checkpoints`` and restart
    up to ``train.max_failures`` times (an evaluation keeps nothing and is not restarted).
    ``worker_env``: environment variables for the workers (besides ``DS_ACCELERATOR=cpu`` on CPU
    workers); ``deterministic``: ``data.deterministic`` (see :func:`sharded_data_config`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    run = plan.run
    t = run.train
    storage_path, storage_fs = storage.for_ray(storage.join(run.storage, run.experiment_name()))
    env = {**({} if t.use_gpu else {"DS_ACCELERATOR": "cpu"}), **(worker_env or {})}
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    kept = {}
    if training:
        kept = {"checkpoint_config": ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
                "failure_config": ray.train.FailureConfig(max_failures=t.max_failures)}
    return TorchTrainer(
        worker_fn,
        train_loop_config=loop_config(plan),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            worker_runtime_env={"env_vars": env} if env else None, callbacks=callbacks,
            logging_config=train_logging_config(), **kept),
        datasets=datasets,
        dataset_config=sharded_data_config(deterministic),
    )


def sharded_data_config(deterministic: bool = False):
    """A ``ray.train.DataConfig`` that splits the ``val`` dataset into uneven shards holding every
    row exactly once (Ray Train's own split is equal-sized and drops the remainder); other datasets
    as Ray Train splits them (equal shards).

    ``deterministic`` (``data.deterministic``): the other datasets run with Ray Data's
    ``preserve_order``, which also turns off the splitter's locality hints, so which rows reach
    which worker, in which order, is a function of the dataset alone (not of task timing)."""
    import ray.data
    import ray.train

    options = None
    if deterministic:  # a copy of the current options (constructing them anew warns of a deprecated field)
        options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
        options.preserve_order = True

    class ShardedEvalDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != VAL}
            out = (super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs) if rest
                   else [{} for _ in range(world_size)])
            if VAL in datasets:
                ds = datasets[VAL]
                if ds.name is None:
                    ds.set_name(VAL)
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][VAL] = split
            return out

    return ShardedEvalDataConfig(execution_options=options, enable_shard_locality=not deterministic)

