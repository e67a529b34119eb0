"""The per-worker training function: one DeepSpeed engine, the workload's dict of losses.

Everything a worker needs arrives in a :class:`~orchestrator.train.plan.WorkerPlan` (the resolved
run config plus the driver's decisions: MLflow run id, export URI, init-from URI, model config,
stream shares); nothing is captured from the driver's globals.  Read top-down:
:func:`train_loop_per_worker` -> :func:`setup_worker` (engine, resume, logger) ->
:func:`run_steps` (the step loop; :class:`~orchestrator.train.schedule.StepSchedule` decides what
each step does) -> :func:`finish` (last checkpoint, export).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Iterator

import torch

from orchestrator import storage
from orchestrator.data import quality
from orchestrator.data.mix import STREAM_KEY, StreamMix, epoch_batches
from orchestrator.data.pipeline import SAMPLE_KEY
from orchestrator.data.streams import TRAIN as MAIN_STREAM
from orchestrator.eval_workers import Validator
from orchestrator.tracking.mlflow_run import MetricLogger, write_pending
from orchestrator.tracking.redact import redact_exception
from orchestrator.train import checkpoint, manifest, momentum_sync, recovery
from orchestrator.train.deepspeed_config import build_deepspeed_config
from orchestrator.train.extensions import clear_stale_extension_locks, use_locked_build_tools
from orchestrator.train.failures import SetupPhase
from orchestrator.train.journal import StepJournal
from orchestrator.train.model_setup import load_run_tokenizer
from orchestrator.train.optim import build_optimizer
from orchestrator.train.plan import WorkerPlan
from orchestrator.train.progress import EpochProgress
from orchestrator.train.schedule import ResumeSkip, StepActions, StepSchedule
from workloads.base import load_workload

log = logging.getLogger(__name__)


class StepTimer:
    """Splits wall time into waiting for data and computing, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wait = 0.0
        self.compute = 0.0
        self.samples = 0
        self.steps = 0
        self.start = time.perf_counter()

    def timed_batches(self, batches) -> Iterator[dict]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            t1 = time.perf_counter()
            yield batch
            self.compute += time.perf_counter() - t1

    def summary(self, world: int) -> dict[str, float]:
        total = max(self.wait + self.compute, 1e-9)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"samples_per_s": self.samples * world / elapsed, "data_wait_frac": self.wait / total}


class LossWindow:
    """Running sums of the losses since the last log; each loss averaged over the micro-batches
    that had it.  Sums stay on the device (no sync per step) until :meth:`means`."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_losses(self, losses: dict[str, torch.Tensor], mix: StreamMix | None, stream: str) -> None:
        for k, v in losses.items():
            self.add(k, v.detach())
        for name in (mix.fractions if mix is not None else ()):
            self.add(f"{name.removeprefix('train_')}_batch_frac", float(stream == name))

    def means(self, world: int) -> dict[str, float]:
        """The window's means, averaged across ranks (a collective); the window starts afresh."""
        means = _mean_across_ranks({k: float(v) / max(self.counts[k], 1) for k, v in self.sums.items()}, world)
        self.sums, self.counts = {}, {}
        return means


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


@dataclasses.dataclass
class Worker:
    """One worker's training run, as :func:`setup_worker` builds it."""

    plan: WorkerPlan
    rank: int
    world: int
    device: Any
    workload: Any
    task_cfg: Any
    engine: Any
    scheduler: Any
    ema_per_step: bool
    constants: dict[str, torch.Tensor]
    validator: Validator
    progress: EpochProgress
    state: TrainState
    resumed: bool
    shard: Any = None  # this worker's shard of the epoch's ``train`` dataset
    metrics_logger: MetricLogger | None = None
    mix: StreamMix | None = None
    preemption: Any = None  # PreemptionCheckpointer
    window: LossWindow = dataclasses.field(default_factory=LossWindow)
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    saved_step: int = -1
    redo: int = 0  # the checkpoint names' redo count (manifest.checkpoint_dir_name)
    carried_metrics: list = dataclasses.field(default_factory=list)  # the resumed checkpoint's undelivered points
    journal: StepJournal | None = None  # $MPLUG2_STEP_JOURNAL: every computed step and its rows (fault tests)

    @property
    def batch_size(self) -> int:
        return self.plan.run.train.batch_size_per_worker

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics_logger is not None:
            self.metrics_logger.log(metrics, step)


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
    """Ray Train's worker function (``config``: ``WorkerPlan.to_loop_config()``).  A config or
    file error during setup is raised as :class:`~orchestrator.train.failures.SetupError`, which
    ends the run at once (no restarts)."""
    phase = SetupPhase()
    try:
        _train(WorkerPlan.from_loop_config(config), phase)
    except Exception as e:  # re-raised, classified
        classified = phase.classify(e)
        if classified is e:
            raise
        raise classified from e


def _train(plan: WorkerPlan, phase: SetupPhase) -> None:
    w = setup_worker(plan)
    phase.done()  # from here on a failure is a fault to restart from
    try:
        run_steps(w)
        finish(w)
    finally:
        if w.metrics_logger is not None:
            delivery = w.metrics_logger.close()
            if delivery["undelivered"] or delivery["dropped"] or delivery["rejected"]:
                log.error("MLflow: %s metric points could not be delivered", delivery)


# ------------------------------------------------------------------------------- setup
def setup_worker(plan: WorkerPlan) -> Worker:
    """The model, its DeepSpeed engine, the validator, the resumed state and the metrics logger."""
    import ray.train
    import ray.train.torch

    run = plan.run
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(run.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    workload, task_cfg, model = build_model(plan)
    # loaded once: the batch constants (instruction prompts) and the init-from vocabulary check use it
    tokenizer = load_run_tokenizer(run) if (workload.batch_constants is not None or (
        plan.init_from and plan.model_config is not None)) else None
    constants: dict[str, torch.Tensor] = {}
    if workload.batch_constants is not None:
        constants = {k: v.to(device) for k, v in workload.batch_constants(tokenizer, task_cfg).items()}
    validator = Validator(run, workload, task_cfg, device, constants, tracker_name=plan.val_tracker)
    if plan.init_from:
        _init_weights(model, plan, tokenizer, rank)
    engine, scheduler, ema_per_step = _build_engine(model.to(device), plan, world)
    progress = EpochProgress(plan.run_name, rank, world)
    w = Worker(plan, rank, world, device, workload, task_cfg, engine, scheduler, ema_per_step, constants,
               validator, progress, TrainState(), resumed=False)
    latest = ray.train.get_checkpoint()
    point = recovery.resume(w, latest)  # the newest complete checkpoint whose download verifies
    w.redo = checkpoint.redo_count(latest, point)  # a fall back behind Ray's latest: new names for redone steps
    w.preemption = PreemptionCheckpointer()
    w.journal = StepJournal(rank)
    w.shard = ray.train.get_dataset_shard(MAIN_STREAM)
    if rank == 0 and plan.mlflow_run_id:
        w.metrics_logger = MetricLogger(plan.tracking_uri, plan.mlflow_run_id, system_metrics=run.tracking.system_metrics)
        w.metrics_logger.requeue(w.carried_metrics)  # the last checkpoint's undelivered points first
        if w.resumed:
            w.log_metrics({"resumed_from_step": w.state.step}, w.state.step)
    if plan.stream_fractions:
        w.mix = StreamMix({k: ray.train.get_dataset_shard(k) for k in plan.stream_fractions}, plan.stream_fractions,
                          w.batch_size, run.data, run.seed, progress=progress, rank=rank, run_name=plan.run_name)
    return w


def build_model(plan: WorkerPlan):
    run = plan.run
    workload = load_workload(run.workload)
    task_cfg = workload.Config.model_validate(run.task)
    model = workload.build_model(plan.model_config, task_cfg, vision_pretrained=run.model.vision_pretrained,
                                 text_pretrained=run.model.text_pretrained)
    return workload, task_cfg, model


def _init_weights(model, plan: WorkerPlan, tokenizer, rank: int) -> None:
    tcfg = plan.run.train
    report = checkpoint.load_weights(model, plan.init_from, tcfg.init_allow_mismatch,
                                     tokenizer if plan.model_config is not None else None, tcfg.init_allow_new_vocab)
    if rank == 0 and report["missing"]:
        log.info("init-from: %d weights not in the checkpoint (freshly initialised): %s",
                 len(report["missing"]), ", ".join(report["missing"][:8]))


def _build_engine(model, plan: WorkerPlan, world: int):
    """(engine, lr scheduler, whether the momentum EMA runs once per optimizer step)."""
    import deepspeed

    tcfg = plan.run.train
    optimizer, scheduler = build_optimizer(model, tcfg)
    use_locked_build_tools()
    if not tcfg.use_gpu:
        clear_stale_extension_locks()
    deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo", dist_init_required=False)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=build_deepspeed_config(tcfg, world, plan.deepspeed_user), dist_init_required=False)
    ema_per_step = momentum_sync.attach(engine.module, world)  # EMA once per optimizer step, global queue
    return engine, scheduler, ema_per_step


# ------------------------------------------------------------------------------- the step loop
def run_steps(w: Worker) -> None:
    """Epochs of micro-batches until ``train.max_steps`` optimizer steps."""
    tcfg, state, run = w.plan.run.train, w.state, w.plan.run
    schedule = StepSchedule.from_config(tcfg, run.eval.every_steps if w.plan.validate else None)
    skip = ResumeSkip(0 if w.progress.has_keys(MAIN_STREAM) else state.epoch_batches)
    timer = StepTimer()
    while state.step < tcfg.max_steps:
        w.progress.begin_pass(MAIN_STREAM, state.epoch)
        seen = skip.seen
        batches = epoch_batches(w.shard, w.mix, w.batch_size, run.data, w.plan.run_name, run.seed, state.epoch,
                                w.rank, state.step)
        for stream, batch in skip.filter(_tagged(timer.timed_batches(batches))):
            if stream == MAIN_STREAM:
                state.epoch_batches += 1  # the epoch's batches only: what a resumed epoch skips
            losses = train_micro_batch(w, stream, batch)
            timer.samples += w.batch_size
            w.window.add_losses(losses, w.mix, stream)
            if w.engine.global_steps == state.step:
                continue  # gradient accumulation: no optimizer step yet
            state.step = w.engine.global_steps
            if w.journal is not None:
                w.journal.step(state.step, state.epoch)
            state.samples += w.batch_size * tcfg.grad_accum_steps * w.world
            actions = schedule.at(state.step)
            after_step(w, actions, timer)
            if actions.last:
                break
        if skip.seen == seen and not w.progress.has_keys(MAIN_STREAM):  # (a resumed pass may have nothing left)
            raise RuntimeError("the training dataset yielded no batch: it is empty or smaller than one batch "
                               f"per worker (batch_size_per_worker={w.batch_size}, workers={w.world})")
        if state.step < tcfg.max_steps:
            end_epoch(w)


def _tagged(batches) -> Iterator[tuple[str, dict]]:
    for batch in batches:
        yield batch.pop(STREAM_KEY, MAIN_STREAM), batch


def train_micro_batch(w: Worker, stream: str, batch: dict) -> dict[str, torch.Tensor]:
    """Record the batch's rows as consumed, move it to the device, and run one micro-step."""
    if SAMPLE_KEY in batch:
        keys = batch.pop(SAMPLE_KEY)
        w.progress.record(stream, keys)
        if w.journal is not None:
            w.journal.batch(stream, keys)
    batch = {k: v.to(w.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch.update(w.constants)
    steps_per_epoch = w.plan.run.train.steps_per_epoch
    if steps_per_epoch:  # e.g. the distillation-weight ramp over the first epoch
        batch["epoch_progress"] = w.state.step / steps_per_epoch
    return micro_step(w.engine, w.workload, batch, w.task_cfg, w.ema_per_step)


def micro_step(engine, workload, batch: dict, task_cfg, ema_per_step: bool) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, backward, ``engine.step()`` (the optimizer steps at the
    accumulation boundary only); after an optimizer step, the momentum EMA (``ema_per_step``,
    see ``momentum_sync.attach``): once per optimizer step, not per micro-batch."""
    losses = workload.loss(engine.module, batch, task_cfg)
    engine.backward(losses["loss"])
    boundary = engine.is_gradient_accumulation_boundary()  # before step(), which advances the count
    engine.step()
    if ema_per_step and boundary:
        engine.module.momentum_update()  # after the optimizer step, before the next forward
    return losses


def after_step(w: Worker, actions: StepActions, timer: StepTimer) -> None:
    """Carry out what the schedule decided for this optimizer step."""
    import ray.train

    step = actions.step
    if actions.report:
        w.last_metrics = {**w.window.means(w.world), "lr": w.scheduler.get_last_lr()[0], **timer.summary(w.world),
                          "step": step, "epoch": w.state.epoch}
        if actions.validate:  # eval/... on the workers
            w.last_metrics.update(w.validator.run(w.engine))
        w.log_metrics({k: v for k, v in w.last_metrics.items() if k != "step"}, step)
        timer.reset()
    if actions.checkpoint:
        t0 = time.perf_counter()
        save_and_report(w)
        w.log_metrics({"checkpoint_s": time.perf_counter() - t0}, step)
        timer.reset()  # checkpoint time is not training throughput
    elif actions.log:
        ray.train.report(dict(w.last_metrics))
    if actions.check_preemption and w.preemption.should_checkpoint():
        if w.saved_step != step:  # a step that just saved answers with that checkpoint: one report per name
            save_and_report(w)
        w.log_metrics({"preemption_checkpoint_step": step}, step)


def end_epoch(w: Worker) -> None:
    """Start the next epoch; rank 0 logs the bad-clip counts (the job stops past the threshold)."""
    w.state.epoch += 1
    w.state.epoch_batches = 0
    w.progress.end_pass(MAIN_STREAM)
    if w.rank != 0:
        return
    stats = quality.end_epoch_report(w.plan.run_name).get("total", {})
    if stats:
        w.log_metrics({"data/clips_seen": stats.get("total_seen", 0), "data/clips_bad": stats.get("bad", 0),
                       **{f"data/bad_{k}": v for k, v in stats.get("by_reason", {}).items()}}, w.state.step)


def finish(w: Worker) -> None:
    """The run's bad-fraction check, a last checkpoint unless the last step took one, then the
    consolidated export into ``<export_uri>/step_<N>/`` and its pointer (manifest.py)."""
    _check_bad_fraction(w)  # every run, also one shorter than an epoch
    if w.saved_step != w.state.step:
        save_and_report(w)
    export_uri = w.plan.export_uri
    if not export_uri:
        return
    recovery.fenced(w)  # no export by a run whose lease was taken over
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "export")
        if checkpoint.export(w.engine, w.plan.run.train.zero_stage, out, w.rank):
            manifest.publish_export(out, export_uri, w.state.step, fence=w.plan.lease_fence)


def save_and_report(w: Worker) -> None:
    """Every rank saves its part and reports it; after every rank's upload, rank 0 writes the
    completion marker listing each file (``checkpoint.commit``, a collective)."""
    import ray.train

    recovery.fenced(w)  # a run whose lease was taken over writes no checkpoint (LeaseLost, not retried)
    reported = {**w.last_metrics, "step": w.state.step}
    consumed = w.progress.gather()  # collective: before any rank saves
    name = manifest.checkpoint_dir_name(w.state.step, w.redo)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(w.engine, d, dataclasses.asdict(w.state), w.rank, metrics=reported)
        w.progress.save(d, consumed)
        if w.rank == 0:
            _carry_bad_clip_counts(d, w.plan.run_name)
            if w.metrics_logger is not None:  # what MLflow has not confirmed yet: a resumed rank 0 sends it
                write_pending(d, w.metrics_logger.pending())
        files = manifest.describe_files(d)
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
    if w.plan.run_dir:  # the completion marker, last (and only while the lease is still this run's)
        recovery.fenced(w)
        checkpoint.commit(files, storage.join(w.plan.run_dir, name), dataclasses.asdict(w.state), reported,
                          w.plan.run.to_dict(), w.rank, w.world)
    w.saved_step = w.state.step


# ------------------------------------------------------------------------------- small pieces
def _mean_across_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


class PreemptionCheckpointer:
    """Checkpoint once when Ray signals that a node of this run is being preempted (a spot reclaim
    drains the node before it goes).  ``ray.train.get_preemption_info`` is a barrier, so every rank
    calls :meth:`should_checkpoint` at the same step; it answers True once per preemption event."""

    def __init__(self) -> None:
        import ray.train

        self._get = getattr(ray.train, "get_preemption_info", None)  # Ray Train V2 (2.55+)
        self._handled: tuple | None = None

    def should_checkpoint(self) -> bool:
        if self._get is None:
            return False
        info = self._get()
        if info is None:
            return False
        key = (info.deadline_ms, tuple(info.preempted_node_ids))
        if key == self._handled:
            return False
        self._handled = key
        log.warning("node preemption signalled (nodes %s, ranks %s, deadline %s ms): checkpointing now",
                    info.preempted_node_ids, info.preempted_ranks, info.deadline_ms)
        return True


def _carry_bad_clip_counts(directory: str, run_name: str | None) -> None:
    """The run's bad-clip counts into the checkpoint (rank 0): a new driver's tracker starts from them."""
    try:
        quality.save_counts(directory, run_name)
    except Exception as e:  # a slow tracker never costs the checkpoint; said loudly
        log.error("bad-clip counts not saved with this checkpoint (%s: %s); a resume from it starts them "
                  "from the tracker's own", type(e).__name__, e)


def _check_bad_fraction(w: Worker) -> None:
    """``data.max_bad_fraction`` over the whole run, decided on rank 0 and raised on every rank together."""
    err = None
    if w.rank == 0:
        try:
            quality.check_run_end(w.plan.run_name, w.plan.run.data.max_bad_fraction)  # all it saw, as at a pass's end
        except quality.TooManyBadClips as e:
            err = e
    if w.world > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if err is not None else 0.0])
        dist.broadcast(flag, src=0)
        if flag.item() and err is None:
            err = quality.TooManyBadClips("too many bad clips (rank 0 has the counts and reasons)")
    if err is not None:
        raise err
