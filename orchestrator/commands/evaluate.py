"""Evaluate a checkpoint with a workload's metrics on its validation split (zero-shot when the
checkpoint is a pre-train); metrics and a predictions table go to MLflow.  The model runs on the
run's Ray Train workers (``train.num_workers``, ``train.use_gpu``), each on a shard of the split;
this process only plans and collects."""
from __future__ import annotations

import argparse
import json

from orchestrator.commands import add_config_arguments, resolve_config
from orchestrator.evaluation.driver import run_evaluation
from orchestrator.tracking.redact import redact


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--checkpoint", required=True, metavar="URI|mlflow:RUN_ID",
                   help="an exported model, a DeepSpeed checkpoint URI, or the MLflow run id of a training run")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--no-track", action="store_true", help="do not write an MLflow run")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    out = run_evaluation(cfg, args.checkpoint, split=args.split, track=not args.no_track)
    print(json.dumps(redact({"checkpoint": out.checkpoint_uri, "mlflow_run_id": out.mlflow_run_id,
                             "metrics": out.metrics}), indent=2))
    return 0
