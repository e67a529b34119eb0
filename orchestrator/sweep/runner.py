"""``run_sweep(sweep_file)``: a Ray Tune sweep whose trials are Ray Train runs, one MLflow parent
run per sweep with one nested child run per trial.

The Tune experiment lives in ``<storage>/sweeps/<name>``; running the same sweep again resumes it
(``Tuner.restore``): finished trials are kept, unfinished and failed ones run again (their Ray
Train runs resume from their last checkpoint).  At the end the best configuration is written to
``<storage>/sweeps/<name>/best.yaml``, a full run config that ``train --config`` accepts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.config import ConfigError, RunConfig
from orchestrator.ray_env import ensure_ray
from orchestrator.sweep.report import (
    TrialRecord,
    backfill_training_metrics,
    log_parent_summary,
    pick_best,
    tag_trial_runs,
)
from orchestrator.sweep.spec import LoadedSweep, load_sweep
from orchestrator.sweep.trial import (
    TRIAL_DONE_KEY,
    run_trial,
    trial_index,
    trial_run_name,
)
from orchestrator.tracking import mlflow_run
from orchestrator.tracking.mlflow_run import client, find_run, get_or_create_experiment

log = logging.getLogger(__name__)

STATE_FILE = "mplug2_sweep.json"


@dataclasses.dataclass
class SweepOutcome:
    name: str
    experiment_path: str              # <storage>/sweeps/<name>: Tune's experiment folder
    parent_run_id: str | None
    tracking_uri: str | None
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_config_uri: str | None       # <experiment_path>/best.yaml
    interrupted: bool                 # stopped before every trial finished: run it again to resume
    resumed: bool


def default_concurrency(base: RunConfig, sweep: LoadedSweep, resources: dict[str, float]) -> int:
    """Trials that fit at once: CPUs for the trial's driver, its Train workers and one decode task;
    GPUs for its workers.  At least 1, at most the number of trials."""
    t = base.train
    cpus = sweep.spec.trial_cpus + t.num_workers * t.cpus_per_worker + base.data.decode_cpus
    n = math.floor(resources.get("CPU", 0) / cpus) if cpus > 0 else sweep.spec.num_trials()
    if t.use_gpu:
        n = min(n, math.floor(resources.get("GPU", 0) / (t.num_workers * t.gpus_per_worker)))
    return max(1, min(n, sweep.spec.num_trials()))


def _tune_storage(uri: str) -> tuple[str, Any]:
    if storage.is_s3(uri):
        fs, path = storage.filesystem(uri)
        return path, fs
    return storage.local_path(uri), None


def _search_params(sweep: LoadedSweep) -> dict[str, Any]:
    s = sweep.spec
    return {"search": {k: p.describe() for k, p in s.search.items()}, "metric": s.metric, "mode": s.mode,
            "num_samples": s.num_samples, "base": str(sweep.base_path), "overrides": json.dumps(sweep.run_overrides),
            "scheduler": s.scheduler.model_dump() if s.scheduler else "none", "max_failures": s.max_failures}


def _check_same_sweep(exp_uri: str, fingerprint: str, name: str) -> bool:
    """True when resuming; a different spec under the same name is refused (its trials would mix)."""
    state_uri = storage.join(exp_uri, STATE_FILE)
    if not storage.exists(state_uri):
        return False
    saved = json.loads(storage.read_text(state_uri)).get("fingerprint")
    if saved != fingerprint:
        raise ConfigError(f"sweep '{name}' already exists at {exp_uri} with a different search space, metric or "
                          "base overrides; resuming it would mix trials of two sweeps. Give this sweep a new "
                          "name (name=...) or delete that folder")
    return True


def _build_tuner(sweep: LoadedSweep, trainable, exp_root: str, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.spec
    scheduler = None
    if s.scheduler is not None:
        sc = s.scheduler
        scheduler = ASHAScheduler(time_attr=sc.time_attr, metric=sc.metric, mode=sc.mode, max_t=sc.max_t,
                                  grace_period=sc.grace_period, reduction_factor=sc.reduction_factor,
                                  stop_last_trials=False)  # the last step must reach the dev evaluation
    path, fs = _tune_storage(exp_root)
    return tune.Tuner(
        trainable,
        param_space={k: p.to_tune() for k, p in s.search.items()},
        tune_config=tune.TuneConfig(num_samples=s.num_samples, max_concurrent_trials=concurrency,
                                    scheduler=scheduler, trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=s.name, storage_path=path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures), verbose=1),
    )


def _records(results, sweep: LoadedSweep, tracking_uri: str | None, experiment: str) -> list[TrialRecord]:
    c = client(tracking_uri) if tracking_uri else None
    exp_id = get_or_create_experiment(c, experiment, tracking_uri) if c else None
    out = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        m = r.metrics or {}
        status = "failed" if r.error else ("completed" if m.get(TRIAL_DONE_KEY) else "early_stopped")
        name = trial_run_name(sweep.spec.name, trial_id)
        run = find_run(c, exp_id, name) if c else None
        if run is not None and status != "completed" and r.metrics_dataframe is not None:
            history = [row for row in r.metrics_dataframe.to_dict("records") if not row.get(TRIAL_DONE_KEY)]
            backfill_training_metrics(tracking_uri, run.info.run_id, history)
        value = m.get(sweep.spec.metric) if status == "completed" else None
        out.append(TrialRecord(index=trial_index(trial_id), trial_id=trial_id, run_name=name, status=status,
                               params={k: (r.config or {}).get(k) for k in sweep.spec.search},
                               metric=float(value) if value is not None else None,
                               step=int(m["step"]) if "step" in m else None,
                               run_id=run.info.run_id if run else None,
                               error=f"{type(r.error).__name__}: {r.error}"[:500] if r.error else None))
    return sorted(out, key=lambda t: t.index)


def run_sweep(sweep_file: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepOutcome:
    from ray import tune


    sweep = load_sweep(sweep_file, overrides)          # validates every searched value first
    spec = sweep.spec
    base = sweep.run_config()
    exp_root = storage.join(spec.storage or base.storage, "sweeps")
    exp_uri = storage.join(exp_root, spec.name)
    fingerprint = spec.model_copy(update={"overrides": sweep.run_overrides}).fingerprint()
    had_state = _check_same_sweep(exp_uri, fingerprint, spec.name)

    ensure_ray()
    import ray

    concurrency = spec.max_concurrent_trials or default_concurrency(base, sweep, ray.cluster_resources())
    tracking_uri = mlflow_run.resolve_tracking_uri(base.tracking.uri) if base.tracking.enabled else None
    experiment = base.experiment_name()
    parent_id = None
    if tracking_uri:
        parent_id = mlflow_run.open_run(
            tracking_uri, experiment, spec.name, _search_params(sweep),
            {"mplug2.kind": "sweep", "mplug2.workload": base.workload, "mplug2.sweep_dir": exp_uri,
             "mplug2.num_trials": spec.num_trials(), "mplug2.max_concurrent_trials": concurrency,
             "mplug2.git_commit": mlflow_run.git_commit()})
    storage.write_text(storage.join(exp_uri, STATE_FILE),
                       json.dumps({"fingerprint": fingerprint, "sweep_file": str(sweep_file),
                                   "parent_run_id": parent_id, "spec": spec.model_dump(mode="json")}, indent=2))

    if spec.scheduler is not None and spec.scheduler.metric.startswith("eval/"):
        # A dev metric is in the reports of validation steps only (every eval.every_steps), not in
        # the training reports between them; ASHA skips results without its metric, but Tune's
        # controller (this process; a new or a restored Tuner) would refuse them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    plan = {"sweep_file": str(sweep_file), "sweep_overrides": list(overrides), "cwd": os.getcwd(),
            "parent_run_id": parent_id, "tracking_uri": tracking_uri}
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": spec.trial_cpus})
    path, fs = _tune_storage(exp_uri)
    resumed = had_state and tune.Tuner.can_restore(path, storage_filesystem=fs)
    if resumed:
        log.info("resuming sweep %s from %s", spec.name, exp_uri)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        tuner = _build_tuner(sweep, trainable, exp_root, concurrency)
    status = "FAILED"
    outcome = None
    try:
        results = tuner.fit()
        trials = _records(results, sweep, tracking_uri, experiment)
        interrupted = results.num_terminated + results.num_errors < spec.num_trials()
        outcome = SweepOutcome(spec.name, exp_uri, parent_id, tracking_uri, trials, None, None, interrupted, resumed)
        if not interrupted:
            _finish(outcome, sweep)
        status = "KILLED" if interrupted else "FINISHED"
    finally:
        if parent_id:
            tags = {"mplug2.sweep_status": "interrupted" if status == "KILLED" else status.lower()}
            mlflow_run.close_run(tracking_uri, parent_id, status=status, tags=tags)
    return outcome


def _finish(outcome: SweepOutcome, sweep: LoadedSweep) -> None:
    spec = sweep.spec
    best = pick_best(outcome.trials, spec.mode)
    outcome.best = best
    best_yaml = None
    if best is not None:
        cfg = sweep.run_config(best.params, name=f"{spec.name}-best")
        best_yaml = (f"# Best trial of sweep '{spec.name}': {best.run_name} ({spec.metric} = {best.metric:.6g}).\n"
                     f"# Train it: python -m orchestrator train --config best.yaml"
                     + (f" --init-from {spec.init_from}" if spec.init_from else "") + "\n" + cfg.to_yaml())
        outcome.best_config_uri = storage.join(outcome.experiment_path, "best.yaml")
        storage.write_text(outcome.best_config_uri, best_yaml)
    if outcome.tracking_uri and outcome.parent_run_id:
        tag_trial_runs(outcome.tracking_uri, outcome.trials, best)
        log_parent_summary(outcome.tracking_uri, outcome.parent_run_id, outcome.trials, best, spec.metric, best_yaml)

