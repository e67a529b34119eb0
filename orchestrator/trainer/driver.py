"""``run_training(cfg)``: the driver side of every training run (pre-train and fine-tune).

Validates, opens the MLflow run (params, resolved config, lineage and environment tags), builds
the Ray Data datasets, runs a ``TorchTrainer`` whose workers each drive one DeepSpeed engine, and
records the checkpoint and exported-model URIs.  Checkpoints live under
``<storage>/<experiment>/<run name>/``; rerunning a name resumes it, and rerunning a finished
name returns at once (no workers, no data read).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

from orchestrator import storage
from orchestrator.config import ConfigError, RunSpec, check_inputs
from orchestrator.console import Progress, summary
from orchestrator.data import progress, quality
from orchestrator.data.catalog import describe_sources
from orchestrator.data.mix import stream_fractions
from orchestrator.data.pipeline import build_stream_datasets
from orchestrator.data.streams import TRAIN, VAL
from orchestrator.data.tokenize import default_tokenizer
from orchestrator.evaluation.data import val_tracker, validation_dataset
from orchestrator.ray_env import ensure_ray
from orchestrator.runtime.model_setup import driver_model_config, load_run_tokenizer
from orchestrator.runtime.ray_train import build_trainer
from orchestrator.tracking import lineage
from orchestrator.tracking.mlflow_run import close_run, open_run, resolve_tracking_uri
from orchestrator.tracking.tags import finished_tags, training_tags
from orchestrator.train.checkpoint import finished_run
from orchestrator.train.deepspeed_config import load_user_json
from orchestrator.train.failures import SetupError, fail_fast_callback, find_not_retryable, plain
from orchestrator.train.journal import ENV as STEP_JOURNAL
from orchestrator.train.lease import LeaseLost, RunLease
from orchestrator.train.manifest import resolve_export
from orchestrator.train.weights import resolve_init_from, write_vocab
from orchestrator.trainer.loop import redacted_train_loop
from orchestrator.trainer.plan import WorkerPlan
from workloads.base import load_workload

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainOutcome:
    run_name: str
    run_dir: str                  # <storage>/<experiment>/<run name>
    checkpoint_uri: str | None    # the latest reported checkpoint
    export_uri: str | None        # the consolidated model (model/ save format)
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str | None
    bad_clips: dict[str, Any] = dataclasses.field(default_factory=dict)  # the run's final counts (quality.py)


def default_run_name(cfg: RunSpec) -> str:
    return f"{cfg.workload}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclasses.dataclass
class _Run:
    """What the driver settles before Ray starts: names, URIs, the model config."""

    cfg: RunSpec
    workload: Any
    run_name: str
    experiment: str
    run_dir: str
    export_uri: str
    tracking_uri: str | None
    init_uri: str | None
    init_run: str | None
    ds_user: dict | None
    model_config: Any = None


def run_training(cfg: RunSpec, init_from: str | None = None, datasets: dict | None = None,
                 extra_tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                 callbacks: list | None = None, register: str | None = None) -> TrainOutcome:
    """``callbacks``: Ray Train callbacks (e.g. Tune's ``TuneReportCallback`` inside a sweep trial);
    ``register``: a model-registry name for the exported model.

    One run per name: the run folder's lease (:mod:`orchestrator.train.lease`) is taken before
    anything else happens and held until the run ends; a second start of a running name raises
    :class:`~orchestrator.train.lease.RunNameInUse` before Ray starts."""
    r = _settle(cfg, init_from)
    with RunLease(r.run_dir, on_lost=_interrupter()) as lease:
        try:
            return _run_training(r, lease, datasets, extra_tags, parent_run_id, callbacks, register)
        except KeyboardInterrupt:  # the heartbeat interrupted the driver: the lease is another run's now
            if lease.lost.is_set():
                lease.fence().check()
            raise


def _interrupter():
    """What the lease's heartbeat does when the lease was taken over: interrupt the driver's main
    thread (during ``fit`` Ray Train's SIGINT handler aborts the run), so it stops at once.  A driver
    outside the main thread (a Tune trial) is stopped by the fences instead: the Train controller at
    the next report, the workers before the next checkpoint or export."""
    if threading.current_thread() is not threading.main_thread():
        return None
    import _thread

    return _thread.interrupt_main


def _run_training(r: _Run, lease: RunLease, datasets: dict | None, extra_tags: dict[str, str] | None,
                  parent_run_id: str | None, callbacks: list | None, register: str | None) -> TrainOutcome:
    done = finished_run(r.run_dir, r.cfg.train.max_steps, r.cfg.to_dict())  # another config: FinishedWithOtherConfig
    if done is not None:
        return _already_finished(r.cfg, r.run_name, r.run_dir, r.export_uri, r.tracking_uri, r.experiment, done,
                                 extra_tags, parent_run_id)
    if datasets is None:  # the run reads its data: data.root must be there (one clear line, before anything)
        check_inputs(r.cfg)
    r.model_config = driver_model_config(r.cfg, r.workload)  # before Ray starts: a bad combination is a ConfigError
    ensure_ray()
    row_counts: dict[tuple[str, str], int] = {}  # rows parsed per (source, split), for the MLflow dataset inputs
    if datasets is None:
        datasets = build_stream_datasets(r.cfg.data, r.cfg.seed, r.workload.COLUMNS, r.run_name, row_counts)
        datasets.update(validation_dataset(r.cfg, r.workload, r.run_name))
    mlflow_run_id = _open_mlflow_run(r, extra_tags, parent_run_id, row_counts)
    plan = WorkerPlan(
        run=r.cfg, run_name=r.run_name, run_dir=r.run_dir, model_config=r.model_config, export_uri=r.export_uri,
        init_from=r.init_uri, deepspeed_user=r.ds_user, mlflow_run_id=mlflow_run_id, tracking_uri=r.tracking_uri,
        stream_fractions=stream_fractions(r.cfg.data.sources, datasets), validate=VAL in datasets,
        val_tracker=val_tracker(r.run_name), lease_fence=lease.fence())
    console = Progress(r.run_name, r.cfg.train.max_steps, printer=log.info, warmup_steps=r.cfg.train.warmup_steps)
    journal = {STEP_JOURNAL: os.environ[STEP_JOURNAL]} if os.environ.get(STEP_JOURNAL) else {}  # a fault test's
    trainer = build_trainer(redacted_train_loop, plan, r.run_name, datasets, training=True,
                            callbacks=[fail_fast_callback(plan.lease_fence), *(callbacks or []), console.callback()],
                            worker_env=journal, deterministic=r.cfg.data.deterministic)
    status, result, started = "FAILED", None, time.time()
    try:
        result = _fit(trainer, console)
        plan.lease_fence.check()  # a run that lost its lease claims no result (LeaseLost)
        status = "FINISHED"
        log.info(summary(r.run_name, result.metrics or console.last, r.cfg.train.max_steps, time.time() - started,
                         storage.checkpoint_uri(result.checkpoint), r.export_uri, mlflow_run_id))
    finally:
        if lease.lost.is_set() or not plan.lease_fence.holds():
            # its MLflow run (found by name), its run-state actors (named) and its folder are the new holder's
            log.error("run %s lost its lease: its MLflow run, actors and checkpoints are left to the run that took "
                      "the name over", r.run_name)
            outcome = None
        else:
            outcome = _close_run(r, mlflow_run_id, status, result, register)
    if outcome is None:
        plan.lease_fence.check()
        raise LeaseLost(f"run folder {r.run_dir}: the lease was taken over; this run stopped")
    return outcome


def _close_run(r: _Run, mlflow_run_id: str | None, status: str, result, register: str | None) -> TrainOutcome:
    """The end of a run that still holds its lease: the final bad-clip counts, the run's actors
    released, the outcome recorded in MLflow (FAILED too)."""
    ckpt_uri = storage.checkpoint_uri(result.checkpoint) if result is not None else None
    export_version = resolve_export(r.export_uri)  # <run>/export/step_N, named by the pointer written last
    exported = export_version is not None
    bad_clips = _final_bad_clips(r.run_name)
    quality.release(r.run_name, val_tracker(r.run_name))  # the run is over: its actors go
    progress.release(r.run_name)
    _record_outcome(r, mlflow_run_id, status, ckpt_uri, export_version, register, bad_clips)
    return TrainOutcome(run_name=r.run_name, run_dir=r.run_dir, checkpoint_uri=ckpt_uri,
                        export_uri=r.export_uri if exported else None,
                        metrics=dict(result.metrics or {}) if result is not None else {},
                        mlflow_run_id=mlflow_run_id, tracking_uri=r.tracking_uri, bad_clips=bad_clips)


def _settle(cfg: RunSpec, init_from: str | None) -> _Run:
    cfg = absolute_paths(cfg)  # workers run in other directories (and on other machines)
    run_name = cfg.name or default_run_name(cfg)
    experiment = cfg.experiment_name()
    run_dir = storage.join(cfg.storage, experiment, run_name)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
    init_uri, init_run = resolve_init_from(init_from, tracking_uri)
    try:
        ds_user = load_user_json(cfg.train.deepspeed_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return _Run(cfg, load_workload(cfg.workload), run_name, experiment, run_dir, storage.join(run_dir, "export"),
                tracking_uri, init_uri, init_run, ds_user)


def _open_mlflow_run(r: _Run, extra_tags: dict[str, str] | None, parent_run_id: str | None,
                     row_counts: dict) -> str | None:
    if not r.tracking_uri:
        return None
    cfg = r.cfg
    tags = training_tags(cfg.workload, cfg.train.num_workers, cfg.train.use_gpu, r.run_dir, r.init_uri, r.init_run,
                         extra_tags)
    mlflow_run_id = open_run(r.tracking_uri, r.experiment, r.run_name, cfg.to_dict(), tags,
                             parent_run_id=parent_run_id or cfg.tracking.parent_run_id)
    lineage.record_datasets(r.tracking_uri, mlflow_run_id, describe_sources(cfg.data, (TRAIN,), rows=row_counts))
    return mlflow_run_id


def _fit(trainer, progress):
    try:
        with progress:
            return trainer.fit()
    except Exception as e:
        stop = find_not_retryable(e)
        if isinstance(stop, SetupError):  # the same on every restart: say it once, as a configuration error
            raise ConfigError(str(stop)) from None
        if stop is not None:  # a data-quality stop, a lost lease: raised once, as itself, with its message
            raise plain(stop) from None
        raise


def _record_outcome(r: _Run, mlflow_run_id: str | None, status: str, ckpt_uri: str | None,
                    export_version: str | None, register: str | None, bad_clips: dict[str, Any]) -> None:
    """The vocabulary beside the export; the MLflow run's end tags, model lineage and status."""
    exported = export_version is not None
    if exported and r.model_config is not None:
        try:  # checked when a fine-tune starts from this export
            write_vocab(load_run_tokenizer(r.cfg), export_version)
        except Exception as e:  # never mask the training outcome
            log.error("could not record the vocabulary beside %s: %s", r.export_uri, e)
    if not mlflow_run_id:
        return
    end_tags = {"mplug2.checkpoint_uri": ckpt_uri, "mplug2.export_uri": r.export_uri if exported else None}
    end_tags.update({f"mplug2.data.{k}": str(v) for k, v in bad_clips.items()
                     if k in ("total_seen", "bad", "by_reason")})
    register_error = None
    if exported and status == "FINISHED":
        try:
            lineage.record_model(r.tracking_uri, mlflow_run_id, export_version, r.run_name,
                                 r.cfg.data.tokenizer or default_tokenizer(r.cfg.data.root), register)
        except RuntimeError as e:  # asked to register and could not: said after the run is closed
            register_error = e
    try:
        close_run(r.tracking_uri, mlflow_run_id, status=status, tags={k: v for k, v in end_tags.items() if v is not None})
    except Exception as e:  # never mask the training error
        log.error("could not close MLflow run %s: %s", mlflow_run_id, e)
    if register_error is not None:
        raise register_error


def absolute_paths(cfg: RunSpec) -> RunSpec:
    """The config with its relative local paths made absolute against the driver's working directory:
    ``data.root`` and ``storage`` always; ``data.tokenizer`` and the ``model.*_pretrained`` checkpoints
    when they exist here (otherwise they are hub names).  Workers then find the same files."""

    def absolute(path: str | None, must_exist: bool) -> str | None:
        if not path or storage.has_scheme(path) or os.path.isabs(path):
            return path
        if must_exist and not os.path.exists(path):
            return path
        return os.path.abspath(path)

    data = cfg.data.model_copy(update={"root": absolute(cfg.data.root, False),
                                       "tokenizer": absolute(cfg.data.tokenizer, True)})
    model = cfg.model.model_copy(update={"vision_pretrained": absolute(cfg.model.vision_pretrained, True),
                                         "text_pretrained": absolute(cfg.model.text_pretrained, True)})
    return cfg.model_copy(update={"data": data, "model": model, "storage": absolute(cfg.storage, False)})


def _already_finished(cfg: RunSpec, run_name: str, run_dir: str, export_uri: str, tracking_uri: str | None,
                      experiment: str, done: tuple[str, dict[str, Any]], extra_tags: dict[str, str] | None,
                      parent_run_id: str | None) -> TrainOutcome:
    """A rerun of a name that already trained to ``max_steps`` and exported: no Ray Train workers,
    no data read; its MLflow run is closed as FINISHED (it may still say RUNNING if the driver that
    trained it died after the export) and the outcome comes from the last checkpoint's marker."""
    ckpt_uri, meta = done
    log.info("run %s already finished at step %s (%s); nothing to train. Raise train.max_steps or "
             "choose a new name to train more.", run_name, meta.get("step"), ckpt_uri)
    mlflow_run_id = None
    if tracking_uri:
        mlflow_run_id = open_run(tracking_uri, experiment, run_name, cfg.to_dict(),
                                 finished_tags(cfg.workload, run_dir, extra_tags),
                                 parent_run_id=parent_run_id or cfg.tracking.parent_run_id)
        close_run(tracking_uri, mlflow_run_id, status="FINISHED",
                  tags={"mplug2.checkpoint_uri": ckpt_uri, "mplug2.export_uri": export_uri})
    metrics = dict(meta.get("metrics") or {})
    metrics.setdefault("step", meta.get("step"))
    return TrainOutcome(run_name=run_name, run_dir=run_dir, checkpoint_uri=ckpt_uri, export_uri=export_uri,
                        metrics=metrics, mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri)


def _final_bad_clips(run_name: str) -> dict[str, Any]:
    """The run's bad-clip counts as its tracker holds them at the end ({} when there is none)."""
    try:
        return quality.get_bad_clip_stats(run_name) or {}
    except Exception:
        return {}
