"""Pre-train or fine-tune: Ray Train workers, one DeepSpeed engine each, fed by the Ray Data plane,
checkpointed to storage and tracked in MLflow.  Rerunning a run name resumes it."""
from __future__ import annotations

import argparse
import json

from orchestrator.commands import add_config_arguments, resolve_config
from orchestrator.tracking.redact import redact
from orchestrator.trainer.driver import run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--init-from", default=None, metavar="URI|mlflow:RUN_ID",
                   help="start from pre-trained weights: an exported model or DeepSpeed checkpoint URI, or the "
                        "MLflow run id of a pre-train (recorded as this run's parent in lineage tags)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="register the exported model in the MLflow model registry under NAME")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    out = run_training(cfg, init_from=args.init_from, register=args.register)
    print(json.dumps(redact({"run_name": out.run_name, "mlflow_run_id": out.mlflow_run_id,
                             "checkpoint": out.checkpoint_uri, "export": out.export_uri,
                             "metrics": {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}}),
                     indent=2))
    return 0
