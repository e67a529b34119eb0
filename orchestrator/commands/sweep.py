"""Ray Tune sweep over fine-tuning hyper-parameters: each trial is a Ray Train run (workers and
DeepSpeed as in training) followed by the workload's dev evaluation; one MLflow parent run per sweep
with a nested child run per trial.  Running the same sweep again resumes it.  The best trial's
full run config is written to <storage>/sweeps/<name>/best.yaml (accepted by `train --config`)."""
from __future__ import annotations

import argparse
import json

from orchestrator.sweep.runner import run_sweep
from orchestrator.sweep.spec import load_sweep
from orchestrator.tracking.redact import redact


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="sweep YAML (see workloads/configs/sweep_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="a sweep key (num_samples=2, storage=s3://b/p, scheduler.grace_period=5) sets it; any "
                        "other key (train.max_steps=10, data.root=s3://b/p) overrides the run config of every trial")
    p.add_argument("--check", action="store_true",
                   help="validate the sweep and every searched value against the run config, print it, and exit")


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.config, args.overrides)
    if args.check:
        print(json.dumps(redact({"sweep": sweep.spec.model_dump(mode="json"), "base": str(sweep.base_path),
                                 "run_overrides": sweep.run_overrides, "grid_trials": sweep.spec.num_trials()}),
                         indent=2))
        return 0

    out = run_sweep(args.config, args.overrides)
    summary = {"sweep": out.name, "experiment_path": out.experiment_path, "parent_run_id": out.parent_run_id,
               "resumed": out.resumed, "interrupted": out.interrupted,
               "trials": {s: sum(t.status == s for t in out.trials) for s in ("completed", "early_stopped", "failed")}}
    if out.best is not None:
        summary["best"] = {"trial": out.best.run_name, "metric": out.best.metric, "params": out.best.params,
                           "mlflow_run_id": out.best.run_id}
    summary["best_config"] = out.best_config_uri
    print(json.dumps(redact(summary), indent=2, default=str))
    if out.interrupted:
        print(f"sweep interrupted: run the same command again to resume it from {out.experiment_path}")
        return 130
    if out.best_config_uri:
        print(f"best config: {out.best_config_uri}")
    return 0
