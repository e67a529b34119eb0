"""A training job as its own process with its own local Ray, for driver-kill and preemption tests:

    python -m tests.reliability.toy_job STORAGE NAME [--steps N] [--sleep S] [--drain-after STEP]

``--drain-after`` asks Ray's GCS to drain this (only) node with reason PREEMPTION once checkpoint
STEP exists: exactly the signal a spot reclaim gives, without the node actually going away.
"""
from __future__ import annotations

import argparse
import os
import threading
import time


def _drain_when(run_dir: str, step: int) -> None:
    import ray
    from ray.core.generated import autoscaler_pb2

    from tests.reliability.helpers import checkpoint_steps, emit

    while not (checkpoint_steps(run_dir) and max(checkpoint_steps(run_dir)) >= step):
        time.sleep(0.1)
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    ok, why = gcs.drain_node(ray.get_runtime_context().get_node_id(),
                             autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                             "reliability test: simulated spot reclaim", int(time.time() * 1000) + 600_000)
    emit({"drained": ok, "why": why, "at_checkpoint": max(checkpoint_steps(run_dir))})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("storage")
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--sleep", type=float, default=0.15)
    ap.add_argument("--drain-after", type=int)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    import ray

    from orchestrator.train.driver import run_training
    from tests.reliability.helpers import REPO, emit, toy_cfg, toy_datasets

    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}})
    try:
        cfg = toy_cfg(args.storage, None, args.name, sleep_s=args.sleep, **{"train.max_steps": args.steps})
        if args.drain_after:
            run_dir = os.path.join(args.storage, cfg.experiment_name(), args.name)
            threading.Thread(target=_drain_when, args=(run_dir, args.drain_after), daemon=True).start()
        out = run_training(cfg, datasets=toy_datasets())
        emit({"result_step": out.metrics.get("step"), "checkpoint": out.checkpoint_uri})
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
