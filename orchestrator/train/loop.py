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

from orchestrator.train import checkpoint
from orchestrator.train.deepspeed_config import build_deepspeed_config
from orchestrator.train.optim import build_optimizer

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


def _iter_batches(shard, batch_size: int, data_cfg, run_name: str | None):
    """Full batches only: every rank takes the same number of steps (DeepSpeed's collectives)."""
    from orchestrator.data.pipeline import iter_worker_batches  # noqa: PLC0415

    return iter_worker_batches(shard, batch_size=batch_size, device="cpu", prefetch_batches=data_cfg.prefetch_batches,
                               drop_last=True, local_shuffle_buffer_size=data_cfg.shuffle_buffer or None,
                               run_name=run_name, max_bad_fraction=data_cfg.max_bad_fraction)


def _mean_across_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    import torch.distributed as dist  # noqa: PLC0415

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
    import glob  # noqa: PLC0415

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
    from workloads import get_workload  # noqa: PLC0415

    workload = get_workload(run.workload)
    task_cfg = workload.Config.model_validate(run.task)
    model_cfg = config.get("model_config")
    model = workload.build_model(model_cfg, task_cfg, vision_pretrained=run.model.vision_pretrained,
                                 text_pretrained=run.model.text_pretrained)
    return workload, task_cfg, model


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed  # noqa: PLC0415
    import ray.train  # noqa: PLC0415
    import ray.train.torch  # noqa: PLC0415

    from orchestrator.config import RunConfig  # noqa: PLC0415

    run = RunConfig.model_validate(config["run"])
    tcfg = run.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(run.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)

    workload, task_cfg, model = build_model(run, config)
    constants: dict[str, torch.Tensor] = {}
    if hasattr(workload, "batch_constants"):
        from orchestrator.train.model_setup import load_run_tokenizer  # noqa: PLC0415

        constants = {k: v.to(device) for k, v in workload.batch_constants(load_run_tokenizer(run), task_cfg).items()}
    from orchestrator.eval_workers import Validator  # noqa: PLC0415

    validator = Validator(run, config, workload, task_cfg, device, constants)  # eval.every_steps + at the end
    if config.get("init_from"):
        report = checkpoint.load_weights(model, config["init_from"])
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

    # epoch_batches: this worker's micro-batches consumed in the current epoch, so a resumed epoch
    # skips what was already trained on instead of repeating it.
    state = {"step": 0, "epoch": 0, "samples": 0, "epoch_batches": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = checkpoint.load(engine, d)
        state.update({k: saved[k] for k in state if k in saved})  # DeepSpeed adds its own keys
        if rank == 0:
            log.info("resumed from step %d (epoch %d)", state["step"], state["epoch"])

    metrics_logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        from orchestrator.tracking.mlflow_run import MetricLogger  # noqa: PLC0415

        metrics_logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"])

    if metrics_logger is not None and ckpt is not None:
        metrics_logger.log({"resumed_from_step": state["step"]}, state["step"])

    timer = StepTimer()
    sums: dict[str, Any] = {}  # loss name -> running sum (a device tensor until logged)
    counts: dict[str, int] = {}
    last_metrics: dict[str, float] = {}
    saved_step = state["step"] if ckpt is not None else -1
    skip = state["epoch_batches"]  # resuming mid-epoch: these batches were trained on before the fault
    preemption = PreemptionCheckpointer()
    shard = ray.train.get_dataset_shard("train")
    text_mix = None
    if config.get("text_fraction"):
        text_mix = TextMix(ray.train.get_dataset_shard("train_text"), config["text_fraction"], tcfg.batch_size_per_worker,
                           run.data, run.seed)
    try:
        while state["step"] < tcfg.max_steps:
            got_batch = False
            batches = _iter_batches(shard, tcfg.batch_size_per_worker, run.data, config.get("run_name"))
            if text_mix is not None:
                batches = text_mix.interleave(batches, state["step"])
            for batch in timer.timed_batches(batches):
                got_batch = True
                is_text = text_mix is not None and "frames" not in batch
                if skip and not is_text:
                    skip -= 1
                    continue
                if is_text and skip:
                    continue  # still skipping the media already trained on: no text steps in between
                if not is_text:
                    state["epoch_batches"] += 1  # media batches only: what a resumed epoch skips
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                batch.update(constants)
                losses = workload.loss(engine.module, batch, task_cfg)
                engine.backward(losses["loss"])
                engine.step()
                timer.samples += tcfg.batch_size_per_worker
                for k, v in losses.items():  # each loss averaged over the micro-batches that had it
                    sums[k] = sums.get(k, 0.0) + v.detach()  # stays on the device: no sync per step
                    counts[k] = counts.get(k, 0) + 1
                if text_mix is not None:
                    sums["text_batch_frac"] = sums.get("text_batch_frac", 0.0) + float(is_text)
                    counts["text_batch_frac"] = counts.get("text_batch_frac", 0) + 1
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
                    _save_and_report(engine, state, last_metrics, rank)
                    saved_step = step
                    if metrics_logger is not None:
                        metrics_logger.log({"checkpoint_s": time.perf_counter() - t0}, step)
                    timer.reset()  # checkpoint time is not training throughput
                elif do_log:
                    ray.train.report(dict(last_metrics))
                if not do_ckpt and step % tcfg.preemption_check_every == 0 and preemption.should_checkpoint():
                    _save_and_report(engine, state, last_metrics, rank)
                    saved_step = step
                    if metrics_logger is not None:
                        metrics_logger.log({"preemption_checkpoint_step": step}, step)
                if step >= tcfg.max_steps:
                    break
            if not got_batch:
                raise RuntimeError("the training dataset yielded no batch: it is empty or smaller than one batch "
                                   f"per worker (batch_size_per_worker={tcfg.batch_size_per_worker}, workers={world})")
            if state["step"] < tcfg.max_steps:
                state["epoch"] += 1
                state["epoch_batches"] = 0
                _epoch_end(config, state, metrics_logger, rank)
        if saved_step != state["step"]:
            _save_and_report(engine, state, last_metrics, rank)
        _export(engine, tcfg.zero_stage, config.get("export_uri"), rank)
    finally:
        if metrics_logger is not None:
            delivery = metrics_logger.close()
            if delivery["undelivered"] or delivery["dropped"]:
                log.error("MLflow: %s metric points could not be delivered", delivery)


class TextMix:
    """Interleaves text-only batches (e.g. pre-training's text corpora, MLM only) with the media
    batches: before each media batch, text batches are drawn while a coin with P(text) = ``fraction``
    says so.  The coin is seeded by (seed, step) alone, so every rank makes the same draws and the
    workers' collectives stay in step; the text stream restarts whenever it runs out."""

    def __init__(self, shard, fraction: float, batch_size: int, data_cfg, seed: int):
        self.shard, self.fraction, self.batch_size, self.data_cfg, self.seed = shard, fraction, batch_size, data_cfg, seed
        self._it = None

    def _next_text(self) -> dict:
        from orchestrator.data.pipeline import iter_worker_batches  # noqa: PLC0415

        for _ in range(2):
            if self._it is None:
                self._it = iter(iter_worker_batches(self.shard, batch_size=self.batch_size, device="cpu",
                                                    prefetch_batches=self.data_cfg.prefetch_batches, drop_last=True))
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("the text-only training dataset yielded no full batch")

    def interleave(self, media_batches, step: int):
        import random  # noqa: PLC0415

        coin = random.Random(f"{self.seed}-{step}")  # same draws on every rank
        for batch in media_batches:
            while coin.random() < self.fraction:
                yield self._next_text()
            yield batch


class PreemptionCheckpointer:
    """Checkpoint once when Ray signals that a node of this run is being preempted (a spot reclaim
    drains the node before it goes).  ``ray.train.get_preemption_info`` is a barrier, so every rank
    calls :meth:`should_checkpoint` at the same step; it answers True once per preemption event."""

    def __init__(self) -> None:
        import ray.train  # noqa: PLC0415

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


def _save_and_report(engine, state: dict[str, Any], metrics: dict[str, float], rank: int) -> None:
    import ray.train  # noqa: PLC0415

    reported = {**metrics, "step": state["step"]}
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(engine, d, dict(state), rank, metrics=reported)
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_step_{state['step']:08d}")


def _epoch_end(config: dict[str, Any], state: dict[str, Any], metrics_logger, rank: int) -> None:
    """Bad-clip counts at the end of each epoch: logged, and the job stops past the threshold."""
    if rank != 0:
        return
    from orchestrator.data import quality  # noqa: PLC0415

    stats = quality.end_epoch_report(config.get("run_name")).get("total", {})
    if metrics_logger is not None and stats:
        metrics_logger.log({"data/clips_seen": stats.get("total_seen", 0), "data/clips_bad": stats.get("bad", 0),
                            **{f"data/bad_{k}": v for k, v in stats.get("by_reason", {}).items()}}, state["step"])


def _export(engine, zero_stage: int, export_uri: str | None, rank: int) -> None:
    if not export_uri:
        return
    from orchestrator import storage  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "export")
        if checkpoint.export(engine, zero_stage, out, rank):
            storage.upload_dir(out, export_uri)
