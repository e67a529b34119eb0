"""The per-worker training function: one DeepSpeed engine running the workload's loss, composed
with components that own their state.

Everything a worker needs arrives in a :class:`~orchestrator.trainer.plan.WorkerPlan` (the resolved
run config plus the driver's decisions: MLflow run id, export URI, init-from URI, model config,
stream shares); nothing is captured from the driver's globals.  Read top-down:
:func:`train_loop_per_worker` -> :func:`setup` (the model, its engine and the components, the
resumed state) -> :meth:`TrainLoop.run` (the step loop) -> :meth:`TrainLoop.finish` (last
checkpoint, export).  The components, each with its own state and a short surface:

- :class:`~orchestrator.train.schedule.StepSchedule`: what each optimizer step does (pure);
- :class:`~orchestrator.train.streams.DataStreams`: the batches of each pass, what they consumed;
- :class:`~orchestrator.train.checkpoint.Checkpointer`: save, resume, export (behind the lease fence);
- :class:`~orchestrator.evaluation.validator.Validator`: validation on the workers, when the schedule says;
- :class:`~orchestrator.train.metrics.MetricDelivery`: Ray Train reports and rank 0's MLflow points;
- :class:`~orchestrator.train.momentum_sync.MomentumSync`: the momentum encoders' EMA per optimizer
  step, run by :class:`TrainStep` (the engine on the workload's loss).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import torch

from orchestrator.data.mix import StreamMix, epoch_batches, train_pass
from orchestrator.data.streams import TRAIN
from orchestrator.evaluation.validator import Validator
from orchestrator.runtime.model_setup import WorkerModel, load_weights_into, setup_model
from orchestrator.runtime.ray_train import plan_from
from orchestrator.tracking.redact import redact_exception
from orchestrator.train.checkpoint import Checkpointer, PreemptionCheckpointer
from orchestrator.train.deepspeed_config import build_deepspeed_config
from orchestrator.train.extensions import load_cpu_comm_op, use_locked_build_tools
from orchestrator.train.failures import SetupPhase
from orchestrator.train.journal import StepJournal
from orchestrator.train.metrics import LossWindow, MetricDelivery, StepTimer, device_memory
from orchestrator.train.momentum_sync import MomentumSync
from orchestrator.train.optim import build_optimizer
from orchestrator.train.progress import EpochProgress
from orchestrator.train.schedule import StepActions, StepSchedule
from orchestrator.train.streams import BadClipCounts, DataStreams, NextPass
from orchestrator.trainer.plan import WorkerPlan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainState:
    """What a checkpoint records of the loop (beside the engine's state).  ``epoch_batches``: this
    worker's micro-batches of the epoch's stream consumed in the current epoch; a resumed epoch
    without recorded rows skips that many."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    epoch_batches: int = 0

    def restore(self, saved: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):  # DeepSpeed adds its own keys to ``saved``
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


# ------------------------------------------------------------------------------- entry points
def redacted_train_loop(config: dict[str, Any]) -> None:
    """:func:`train_loop_per_worker` whose exceptions leave the worker (to Ray's logs, the driver,
    MLflow) with credentials masked in their messages."""
    try:
        train_loop_per_worker(config)
    except BaseException as e:
        redact_exception(e)  # in place
        raise


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function (``config``: ``{"plan": WorkerPlan}``).  A config or
    file error during setup is raised as :class:`~orchestrator.train.failures.SetupError`, which
    ends the run at once (no restarts)."""
    phase = SetupPhase()
    try:
        _train(plan_from(config, WorkerPlan), phase)
    except Exception as e:  # re-raised, classified
        classified = phase.classify(e)
        if classified is e:
            raise
        raise classified from e


def _train(plan: WorkerPlan, phase: SetupPhase) -> None:
    loop = setup(plan)
    phase.done()  # from here on a failure is a fault to restart from
    try:
        loop.run()
        loop.finish()
    finally:
        loop.checkpointer.close()  # an upload still in flight (a failed run) is never committed
        loop.metrics.close()


# ------------------------------------------------------------------------------- setup
def setup(plan: WorkerPlan) -> "TrainLoop":
    """The model, its DeepSpeed engine, the components, and the state resumed from the newest
    checkpoint that verifies."""
    import ray.train
    import ray.train.torch

    run = plan.run
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(run.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    model = setup_model(run, plan.model_config, device, pretrained=True)
    validator = Validator(run, model, tracker_name=plan.val_tracker) if plan.validate else None
    if plan.init_from:
        _init_weights(model, plan, rank)
    engine = _build_engine(model.module.to(device), plan, world)
    momentum = MomentumSync(engine.module, world)  # EMA once per optimizer step, global queue

    progress = EpochProgress(plan.run_name, rank, world)
    counts = BadClipCounts(plan.run_name, rank, world, run.data.max_bad_fraction)
    metrics = MetricDelivery(rank)
    checkpointer = Checkpointer(engine, [progress, counts, metrics], run_dir=plan.run_dir, fence=plan.lease_fence,
                                rank=rank, world=world, run_config=run.to_dict(), preemption=PreemptionCheckpointer(),
                                upload=run.train.checkpoint_upload)
    state = TrainState()
    t0 = time.perf_counter()
    saved = checkpointer.resume(ray.train.get_checkpoint())
    resume_s = time.perf_counter() - t0  # download, verify and load the checkpoint
    if saved is not None:
        state.restore(saved)
    metrics.connect(plan.tracking_uri, plan.mlflow_run_id, system_metrics=run.tracking.system_metrics)
    if saved is not None:
        metrics.log({"resumed_from_step": state.step, "resume_s": resume_s}, state.step)

    streams = DataStreams(_passes(plan, progress, rank), progress, counts, StepJournal(rank),
                          resume_batches=state.epoch_batches, batch_size=run.train.batch_size_per_worker, world=world,
                          next_pass=_next_pass(plan, progress, state, rank), rank=rank)
    schedule = StepSchedule.from_config(run.train, run.eval.every_steps if plan.validate else None)
    step = TrainStep(engine, model, momentum, world, run.train.steps_per_epoch)
    return TrainLoop(plan, step, schedule, streams, checkpointer, metrics, validator=validator, state=state)


def _passes(plan: WorkerPlan, progress: EpochProgress, rank: int):
    """This rank's passes over its shard of ``train``, the mixed-in streams interleaved."""
    import ray.train

    run = plan.run
    batch_size = run.train.batch_size_per_worker
    mix = None
    if plan.stream_fractions:
        mix = StreamMix({k: ray.train.get_dataset_shard(k) for k in plan.stream_fractions}, plan.stream_fractions,
                        batch_size, run.data, run.seed, progress=progress, rank=rank, run_name=plan.run_name)
    return functools.partial(epoch_batches, ray.train.get_dataset_shard(TRAIN), mix, batch_size, run.data,
                             plan.run_name, run.seed, rank=rank)


def _next_pass(plan: WorkerPlan, progress: EpochProgress, state: "TrainState", rank: int) -> NextPass | None:
    """The train stream's next pass started while the last batches of a pass train
    (``data.next_epoch_batches``; None when 0)."""
    import ray.train

    run = plan.run
    hold = run.data.next_epoch_batches
    if not hold:
        return None
    steps_held = -(-hold // run.train.grad_accum_steps)
    return NextPass(functools.partial(train_pass, ray.train.get_dataset_shard(TRAIN), run.train.batch_size_per_worker,
                                      run.data, plan.run_name, run.seed, rank=rank),
                    functools.partial(progress.announce, TRAIN),
                    lambda epoch: state.step + steps_held < run.train.max_steps, hold)


def _init_weights(model: WorkerModel, plan: WorkerPlan, rank: int) -> None:
    report = load_weights_into(model, plan.init_from, plan.run)
    if rank == 0 and report["missing"]:
        log.info("init-from: %d weights not in the checkpoint (freshly initialised): %s",
                 len(report["missing"]), ", ".join(report["missing"][:8]))


def _build_engine(module: torch.nn.Module, plan: WorkerPlan, world: int):
    """The DeepSpeed engine around ``module`` (its LR scheduler: ``engine.lr_scheduler``)."""
    import deepspeed

    tcfg = plan.run.train
    optimizer, scheduler = build_optimizer(module, tcfg)
    use_locked_build_tools()
    if not tcfg.use_gpu:
        load_cpu_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo", dist_init_required=False)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(tcfg, world, plan.deepspeed_user),
                                           dist_init_required=False)
    return engine


# ------------------------------------------------------------------------------- the loop
class TrainStep:
    """The DeepSpeed engine stepping on the workload's loss, one micro-batch at a time; the same
    steps on each of ``world`` data-parallel workers.  Its state is the engine's: the weights, the
    optimizer, the LR schedule, the number of optimizer steps taken."""

    def __init__(self, engine, model: WorkerModel, momentum: MomentumSync | None = None, world: int = 1,
                 steps_per_epoch: int | None = None) -> None:
        self.engine, self.model, self.momentum, self.world = engine, model, momentum, world
        self.steps_per_epoch = steps_per_epoch

    @property
    def optimizer_steps(self) -> int:
        return self.engine.global_steps

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def __call__(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Move the batch to the device, add the batch constants, and run one micro-step (``step``:
        the optimizer steps taken so far)."""
        batch = self.model.on_device(batch, non_blocking=True)
        if self.steps_per_epoch:  # e.g. the distillation-weight ramp over the first epoch
            batch["epoch_progress"] = step / self.steps_per_epoch
        return micro_step(self.engine, self.model.workload, batch, self.model.task_cfg, self.momentum)


class TrainLoop:
    """One worker's training run: the step (:class:`TrainStep`) runs the workload's loss; the
    components decide (the schedule), feed (the streams), save (the checkpointer), validate and
    deliver metrics.  Its own state: :class:`TrainState`, and the metrics of the current logging
    window (losses, timer, the last reported metrics)."""

    def __init__(self, plan: WorkerPlan, step: TrainStep, schedule: StepSchedule, streams: DataStreams,
                 checkpointer: Checkpointer, metrics: MetricDelivery, *, validator: Validator | None = None,
                 state: TrainState | None = None) -> None:
        self.plan, self.step, self.schedule, self.streams = plan, step, schedule, streams
        self.checkpointer, self.metrics, self.validator = checkpointer, metrics, validator
        self.state = state or TrainState()
        self.batch_size = plan.run.train.batch_size_per_worker
        self.mixed = tuple(plan.stream_fractions)  # the mixed-in streams: their share of batches is logged
        self.window, self.timer = LossWindow(), StepTimer()
        self.last_metrics: dict[str, float] = {}  # the last logged step's: reported with each checkpoint
        self.prepared = False  # the checkpointer's host buffers (async uploads) asked for at the first step
        self.copy_waited = 0.0  # the checkpointer's copy_wait_s at the last commit

    def run(self) -> None:
        """Epochs of micro-batches until ``train.max_steps`` optimizer steps."""
        state, tcfg, world = self.state, self.plan.run.train, self.step.world
        while state.step < tcfg.max_steps:
            for stream, batch in self.streams.epoch(state.epoch, state.step, self.timer.timed_batches):
                if stream == TRAIN:
                    state.epoch_batches += 1  # the epoch's batches only: what a resumed epoch skips
                losses = self.step(batch, state.step)
                self.timer.samples += self.batch_size
                self.window.add_losses(losses, self.mixed, stream)
                if self.step.optimizer_steps == state.step:
                    continue  # gradient accumulation: no optimizer step yet
                state.step = self.step.optimizer_steps
                self.streams.step_done(state.step, state.epoch)
                state.samples += self.batch_size * tcfg.grad_accum_steps * world
                actions = self.schedule.at(state.step)
                self.after_step(actions)
                if actions.last:
                    break
            if state.step < tcfg.max_steps:
                self.end_epoch()

    def after_step(self, actions: StepActions) -> None:
        """Carry out what the schedule decided for this optimizer step."""
        step, world = actions.step, self.step.world
        if not self.prepared:  # the optimizer's state exists now: the first checkpoint's buffers, ahead
            self.prepared = True
            took = self.checkpointer.prepare()
            if took:
                self.metrics.log({"checkpoint_prepare_s": took}, step)
        committed = self.checkpointer.poll()  # an async checkpoint whose upload ended on every rank
        if committed is not None:
            waited, self.copy_waited = self.checkpointer.copy_wait_s - self.copy_waited, self.checkpointer.copy_wait_s
            self.metrics.log({"checkpoint_upload_s": time.perf_counter() - committed.started,
                              "checkpoint_copy_wait_s": waited}, step)
        if actions.report:
            self.last_metrics = {**self.window.means(world), "lr": self.step.lr(), **self.timer.summary(world),
                                 **device_memory(), "step": step, "epoch": self.state.epoch}
            if actions.validate:  # eval/... on the workers
                t0 = time.perf_counter()
                self.last_metrics.update(self.validator.run())
                self.last_metrics["eval_s"] = time.perf_counter() - t0
            self.metrics.log({k: v for k, v in self.last_metrics.items() if k != "step"}, step)
            self.timer.reset()
        if actions.checkpoint:
            t0 = time.perf_counter()
            self.save()
            self.metrics.log({"checkpoint_s": time.perf_counter() - t0}, step)  # the step's stall
            self.timer.reset()  # checkpoint time is not training throughput
        elif actions.log:
            self.metrics.report(self.last_metrics)
        if actions.check_preemption and self.checkpointer.preempted():
            if self.checkpointer.saved_step != step:  # a step that just saved answers with that checkpoint
                self.save(durable=True)
            else:
                self.checkpointer.drain()  # the node is going: that checkpoint must be complete now
            self.metrics.log({"preemption_checkpoint_step": step}, step)

    def end_epoch(self) -> None:
        """Start the next epoch; rank 0 logs the bad-clip counts (the job stops past the threshold)."""
        self.state.epoch += 1
        self.state.epoch_batches = 0
        counts = self.streams.end_epoch()
        if counts:
            self.metrics.log(counts, self.state.step)

    def finish(self) -> None:
        """The run's bad-fraction check, a last checkpoint unless the last step took one, then the
        consolidated export into ``<export_uri>/step_<N>/`` and its pointer (manifest.py)."""
        self.streams.counts.check_run_end()  # every run, also one shorter than an epoch
        if self.checkpointer.saved_step != self.state.step:
            self.save()
        self.checkpointer.drain()  # the run ends (and exports) only once its last checkpoint is complete
        if self.plan.export_uri:
            self.checkpointer.export(self.plan.export_uri, self.state.step)

    def save(self, durable: bool = False) -> None:
        """A checkpoint of this step (a collective), reported with the last logged metrics
        (``durable``: complete when this returns, also with an asynchronous upload)."""
        self.checkpointer.save(self.state.step, dataclasses.asdict(self.state), self.last_metrics, durable=durable)


def micro_step(engine, workload, batch: dict, task_cfg, momentum: MomentumSync | None = None
               ) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, backward, ``engine.step()`` (the optimizer steps at the
    accumulation boundary only); after an optimizer step, the momentum EMA (once per optimizer
    step, not per micro-batch: see :mod:`~orchestrator.train.momentum_sync`)."""
    losses = workload.loss(engine.module, batch, task_cfg)
    engine.backward(losses["loss"])
    boundary = engine.is_gradient_accumulation_boundary()  # before step(), which advances the count
    engine.step()
    if momentum is not None:
        momentum.after_micro_batch(boundary)  # after the optimizer step, before the next forward
    return losses
