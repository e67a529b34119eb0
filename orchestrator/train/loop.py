"""The per-worker training function: one DeepSpeed engine, the workload's dict of losses.

Everything a worker needs arrives in ``config`` (the resolved run config as a dict, plus the
driver's decisions: MLflow run id, export URI, init-from URI, vocabulary size); nothing is
captured from the driver's globals.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Iterator

import torch

from orchestrator import storage
from orchestrator.config import RunConfig
from orchestrator.data import quality
from orchestrator.data.pipeline import iter_worker_batches
from orchestrator.eval_workers import Validator
from orchestrator.tracking.mlflow_run import MetricLogger
from orchestrator.tracking.redact import redact_exception
from orchestrator.train import checkpoint, momentum_sync
from orchestrator.train.deepspeed_config import build_deepspeed_config
from orchestrator.train.failures import SetupPhase
from orchestrator.train.model_setup import load_run_tokenizer
from orchestrator.train.optim import build_optimizer
from orchestrator.train.progress import EpochProgress
from workloads import get_workload

SAMPLE_KEY = "sample_key"  # orchestrator.data.pipeline.SAMPLE_KEY (not imported: keeps Ray Data out of import time)
STREAM_KEY = "_stream"     # set by StreamMix on the batches it mixes in

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


def _iter_batches(shard, batch_size: int, data_cfg, run_name: str | None, shuffle_seed: int | None = None):
    """Full batches only: every rank takes the same number of steps (DeepSpeed's collectives).
    The local shuffle buffer is seeded by ``shuffle_seed`` (the loop passes one per (seed, epoch, rank))."""
    return iter_worker_batches(shard, batch_size=batch_size, device="cpu", prefetch_batches=data_cfg.prefetch_batches,
                               drop_last=True, local_shuffle_buffer_size=data_cfg.shuffle_buffer or None,
                               run_name=run_name, max_bad_fraction=data_cfg.max_bad_fraction,
                               local_shuffle_seed=shuffle_seed)


def pass_seed(seed: int, stream: str, epoch: int, rank: int) -> int:
    """The local shuffle seed of one pass of one stream on one rank."""
    import zlib

    return zlib.crc32(f"{seed}-{stream}-{epoch}-{rank}".encode())


def _mean_across_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


STALE_LOCK_S = 600  # far longer than DeepSpeed's CPU op takes to compile (~30 s)


def clear_stale_extension_locks(max_age_s: float = STALE_LOCK_S) -> list[str]:
    """Remove torch JIT-extension build locks left by a killed process.

    DeepSpeed's CPU backend JIT-builds its shared-memory allreduce op under a lock file in the
    torch extensions directory; a worker SIGKILLed while holding it (a preemption, a fault) leaves
    the file behind and every later worker on that node waits for it forever.  A lock older than
    any real build is stale: remove it, and say so.
    """
    import glob

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    removed = []
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
        except OSError:
            continue  # another worker removed it first
    if removed:
        log.warning("removed stale torch extension build lock(s) left by a killed process: %s", removed)
    return removed


def build_model(run, config: dict[str, Any]):
    workload = get_workload(run.workload)
    task_cfg = workload.Config.model_validate(run.task)
    model_cfg = config.get("model_config")
    model = workload.build_model(model_cfg, task_cfg, vision_pretrained=run.model.vision_pretrained,
                                 text_pretrained=run.model.text_pretrained)
    return workload, task_cfg, model


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


def redacted_train_loop(config: dict[str, Any]) -> None:
    """:func:`train_loop_per_worker` whose exceptions leave the worker (to Ray's logs, the driver,
    MLflow) with credentials masked in their messages."""
    try:
        train_loop_per_worker(config)
    except BaseException as e:
        redact_exception(e)  # in place
        raise


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function: a config or file error during setup is raised as
    :class:`~orchestrator.train.failures.SetupError`, which ends the run at once (no restarts)."""
    phase = SetupPhase()
    try:
        _train(config, phase)
    except Exception as e:  # re-raised, classified
        classified = phase.classify(e)
        if classified is e:
            raise
        raise classified from e


def _train(config: dict[str, Any], phase) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch


    run = RunConfig.model_validate(config["run"])
    tcfg = run.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(run.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)

    workload, task_cfg, model = build_model(run, config)

    # loaded once: the batch constants (instruction prompts) and the init-from vocabulary check use it
    tokenizer = load_run_tokenizer(run) if (hasattr(workload, "batch_constants") or (
        config.get("init_from") and config.get("model_config") is not None)) else None
    constants: dict[str, torch.Tensor] = {}
    if hasattr(workload, "batch_constants"):
        constants = {k: v.to(device) for k, v in workload.batch_constants(tokenizer, task_cfg).items()}

    validator = Validator(run, config, workload, task_cfg, device, constants)  # eval.every_steps + at the end
    if config.get("init_from"):
        report = checkpoint.load_weights(model, config["init_from"], tcfg.init_allow_mismatch,
                                         tokenizer if config.get("model_config") is not None else None,
                                         tcfg.init_allow_new_vocab)
        if rank == 0 and report["missing"]:
            log.info("init-from: %d weights not in the checkpoint (freshly initialised): %s",
                     len(report["missing"]), ", ".join(report["missing"][:8]))
    model.to(device)
    optimizer, scheduler = build_optimizer(model, tcfg)
    if not tcfg.use_gpu:
        clear_stale_extension_locks()
    deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo", dist_init_required=False)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=build_deepspeed_config(tcfg, world, config.get("deepspeed_user")), dist_init_required=False)
    ema_per_step = momentum_sync.attach(engine.module, world)  # EMA once per optimizer step, global queue

    # epoch_batches: this worker's micro-batches consumed in the current epoch.  A resumed epoch
    # leaves out the rows recorded in the checkpoint's progress (datasets with sample keys), or
    # else skips this many batches (datasets without keys, e.g. a single-block in-memory one).
    state = {"step": 0, "epoch": 0, "samples": 0, "epoch_batches": 0}
    progress = EpochProgress(config.get("run_name"), rank, world)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        checkpoint.check_own(ckpt.path, config.get("run_dir"))
        with ckpt.as_directory() as d:
            saved = checkpoint.load(engine, d)
            progress.load(d)
        state.update({k: saved[k] for k in state if k in saved})  # DeepSpeed adds its own keys
        if rank == 0:
            log.info("resumed from step %d (epoch %d)", state["step"], state["epoch"])

    metrics_logger = None
    if rank == 0 and config.get("mlflow_run_id"):

        metrics_logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"],
                                      system_metrics=run.tracking.system_metrics)

    if metrics_logger is not None and ckpt is not None:
        metrics_logger.log({"resumed_from_step": state["step"]}, state["step"])

    timer = StepTimer()
    sums: dict[str, Any] = {}  # loss name -> running sum (a device tensor until logged)
    counts: dict[str, int] = {}
    last_metrics: dict[str, float] = {}
    saved_step = state["step"] if ckpt is not None else -1
    # resuming mid-epoch without recorded rows: these batches were trained on before the fault
    skip = 0 if progress.has_keys("train") else state["epoch_batches"]
    preemption = PreemptionCheckpointer()
    shard = ray.train.get_dataset_shard("train")
    mix = None
    fractions = dict(config.get("stream_fractions") or {})
    if config.get("text_fraction") and not fractions:
        fractions = {"train_text": config["text_fraction"]}
    if fractions:
        mix = StreamMix({k: ray.train.get_dataset_shard(k) for k in fractions}, fractions, tcfg.batch_size_per_worker,
                        run.data, run.seed, progress=progress, rank=rank, run_name=config.get("run_name"))
    phase.done()  # from here on a failure is a fault to restart from
    try:
        while state["step"] < tcfg.max_steps:
            got_batch = False
            progress.begin_pass("train", state["epoch"])
            batches = _iter_batches(shard, tcfg.batch_size_per_worker, run.data, config.get("run_name"),
                                    pass_seed(run.seed, "train", state["epoch"], rank))
            if mix is not None:
                batches = mix.interleave(batches, state["step"])
            for batch in timer.timed_batches(batches):
                got_batch = True
                stream = batch.pop(STREAM_KEY, "train")
                mixed_in = stream != "train"  # a mixed-in stream (text-only or images), not the epoch's
                if skip and not mixed_in:
                    skip -= 1
                    continue
                if mixed_in and skip:
                    continue  # still skipping the epoch's batches already trained on: no mixed-in steps between
                if not mixed_in:
                    state["epoch_batches"] += 1  # the epoch's batches only: what a resumed epoch skips
                if SAMPLE_KEY in batch:
                    progress.record(stream, batch.pop(SAMPLE_KEY))
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                batch.update(constants)
                if tcfg.steps_per_epoch:  # e.g. the distillation-weight ramp over the first epoch
                    batch["epoch_progress"] = state["step"] / tcfg.steps_per_epoch
                losses = micro_step(engine, workload, batch, task_cfg, ema_per_step)
                timer.samples += tcfg.batch_size_per_worker
                for k, v in losses.items():  # each loss averaged over the micro-batches that had it
                    sums[k] = sums.get(k, 0.0) + v.detach()  # stays on the device: no sync per step
                    counts[k] = counts.get(k, 0) + 1
                if mix is not None:
                    for name in mix.fractions:
                        key = f"{name.removeprefix('train_')}_batch_frac"
                        sums[key] = sums.get(key, 0.0) + float(stream == name)
                        counts[key] = counts.get(key, 0) + 1
                if engine.global_steps == state["step"]:
                    continue  # gradient accumulation: no optimizer step yet
                state["step"] = engine.global_steps
                state["samples"] += tcfg.batch_size_per_worker * tcfg.grad_accum_steps * world
                step = state["step"]
                do_log = step % tcfg.log_every == 0 or step >= tcfg.max_steps or validator.due(step)
                do_ckpt = step % tcfg.checkpoint_every == 0 or step >= tcfg.max_steps
                if do_log or do_ckpt:
                    means = _mean_across_ranks({k: float(v) / max(counts[k], 1) for k, v in sums.items()}, world)
                    last_metrics = {**means, "lr": scheduler.get_last_lr()[0], **timer.summary(world),
                                    "step": step, "epoch": state["epoch"]}
                    last_metrics.update(validator.run(engine, step))  # eval/... on the workers, when due
                    if metrics_logger is not None:
                        metrics_logger.log({k: v for k, v in last_metrics.items() if k not in ("step",)}, step)
                    sums, counts = {}, {}
                    timer.reset()
                if do_ckpt:
                    t0 = time.perf_counter()
                    _save_and_report(engine, state, last_metrics, rank, progress)
                    saved_step = step
                    if metrics_logger is not None:
                        metrics_logger.log({"checkpoint_s": time.perf_counter() - t0}, step)
                    timer.reset()  # checkpoint time is not training throughput
                elif do_log:
                    ray.train.report(dict(last_metrics))
                if not do_ckpt and step % tcfg.preemption_check_every == 0 and preemption.should_checkpoint():
                    _save_and_report(engine, state, last_metrics, rank, progress)
                    saved_step = step
                    if metrics_logger is not None:
                        metrics_logger.log({"preemption_checkpoint_step": step}, step)
                if step >= tcfg.max_steps:
                    break
            if not got_batch and not progress.has_keys("train"):  # (a resumed pass may have nothing left)
                raise RuntimeError("the training dataset yielded no batch: it is empty or smaller than one batch "
                                   f"per worker (batch_size_per_worker={tcfg.batch_size_per_worker}, workers={world})")
            if state["step"] < tcfg.max_steps:
                state["epoch"] += 1
                state["epoch_batches"] = 0
                progress.end_pass("train")
                _epoch_end(config, state, metrics_logger, rank)
        if saved_step != state["step"]:
            _save_and_report(engine, state, last_metrics, rank, progress)
        _export(engine, tcfg.zero_stage, config.get("export_uri"), rank)
    finally:
        if metrics_logger is not None:
            delivery = metrics_logger.close()
            if delivery["undelivered"] or delivery["dropped"]:
                log.error("MLflow: %s metric points could not be delivered", delivery)


class StreamMix:
    """Interleaves batches of other streams with the epoch's batches: mixed-in text-only batches
    (pre-training's text corpora, MLM only) and, in a run mixing images and videos, image batches
    (T = 1 frame, so images skip the temporal module and are prompted as images).  Before each
    epoch batch, a coin decides whether a mixed-in batch comes first and from which stream
    (P(stream) = ``fractions[stream]``); the coin is seeded by (seed, step) alone, so every rank
    makes the same draws, runs the same modules in the same order (ZeRO-3, DeepSpeed's
    collectives) and stays in step.  A mixed-in stream starts a new pass whenever it runs out.
    Each mixed-in batch carries its stream's name under ``STREAM_KEY``."""

    def __init__(self, shards: dict, fractions: dict[str, float], batch_size: int, data_cfg, seed: int,
                 progress: EpochProgress | None = None, rank: int = 0, run_name: str | None = None):
        if sum(fractions.values()) >= 1:
            raise ValueError(f"mixed-in stream fractions {fractions} must sum to less than 1")
        self.shards, self.fractions, self.batch_size, self.data_cfg, self.seed = shards, dict(fractions), batch_size, \
            data_cfg, seed
        self.progress, self.rank, self.run_name = progress, rank, run_name
        self._its: dict[str, Any] = {}

    def _next(self, name: str) -> dict:
        for _ in range(2):
            if name not in self._its:
                epoch = 0
                if self.progress is not None:
                    self.progress.begin_pass(name)
                    epoch = self.progress.passes[name]
                self._its[name] = iter(_iter_batches(self.shards[name], self.batch_size, self.data_cfg, self.run_name,
                                                     pass_seed(self.seed, name, epoch, self.rank)))
            try:
                return {**next(self._its[name]), STREAM_KEY: name}
            except StopIteration:
                del self._its[name]
                if self.progress is not None:
                    self.progress.end_pass(name)
        raise RuntimeError(f"the {name} training dataset yielded no full batch")

    def interleave(self, batches, step: int):
        import random

        coin = random.Random(f"{self.seed}-{step}")  # same draws on every rank
        streams = sorted(self.fractions)
        for batch in batches:
            while True:
                r, edge, pick = coin.random(), 0.0, None
                for name in streams:
                    edge += self.fractions[name]
                    if r < edge:
                        pick = name
                        break
                if pick is None:
                    break
                yield self._next(pick)
            yield batch


class TextMix(StreamMix):
    """:class:`StreamMix` with one mixed-in stream, the text-only ``train_text``."""

    def __init__(self, shard, fraction: float, batch_size: int, data_cfg, seed: int):
        super().__init__({"train_text": shard}, {"train_text": fraction}, batch_size, data_cfg, seed)

    def _next(self, name: str) -> dict:
        return self._next_text()

    def _next_text(self) -> dict:
        return StreamMix._next(self, "train_text")


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


def _save_and_report(engine, state: dict[str, Any], metrics: dict[str, float], rank: int,
                     progress: "EpochProgress | None" = None) -> None:
    import ray.train

    reported = {**metrics, "step": state["step"]}
    consumed = progress.gather() if progress is not None else None  # collective: before any rank saves
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(engine, d, dict(state), rank, metrics=reported)
        if consumed is not None:
            progress.save(d, consumed)
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_step_{state['step']:08d}")


def _epoch_end(config: dict[str, Any], state: dict[str, Any], metrics_logger, rank: int) -> None:
    """Bad-clip counts at the end of each epoch: logged, and the job stops past the threshold."""
    if rank != 0:
        return

    stats = quality.end_epoch_report(config.get("run_name")).get("total", {})
    if metrics_logger is not None and stats:
        metrics_logger.log({"data/clips_seen": stats.get("total_seen", 0), "data/clips_bad": stats.get("bad", 0),
                            **{f"data/bad_{k}": v for k, v in stats.get("by_reason", {}).items()}}, state["step"])


def _export(engine, zero_stage: int, export_uri: str | None, rank: int) -> None:
    if not export_uri:
        return

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "export")
        if checkpoint.export(engine, zero_stage, out, rank):
            storage.upload_dir(out, export_uri)
