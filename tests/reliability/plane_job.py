"""A training job on the real data plane as its own process, for faults under a real run:

    python -m tests.reliability.plane_job SPEC.json

SPEC names the data root (coco_captions images with ids), storage, run name, steps, workers and
Ray: ``address`` (a running cluster to join, e.g. the two-node one) or none (a local Ray of its
own, ``num_cpus``).  ``drain_request``: a file the test writes once it wants a node drained; it
names the node's temp dir (``ray start --temp-dir``), and the node whose raylet socket lies under
it is drained with reason PREEMPTION (the notice a spot reclaim gives); one JSON line says so.  Everything the job's Ray processes need reaches them through the runtime
env: ``AWS_ENDPOINT_URL`` (the fault proxy, so the Train workers' clip reads and checkpoint
uploads go through it), the S3 retry settings, ``$MPLUG2_STEP_JOURNAL``.  The job prints one JSON
line at the end: the result step, the checkpoint and the run's bad-clip counts.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import ray

from orchestrator.config import load_config
from orchestrator.trainer.driver import run_training
from tests.reliability.helpers import REPO, emit

PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED", "MPLUG2_S3_MAX_ATTEMPTS", "MPLUG2_S3_READ_TIMEOUT_S", "MPLUG2_STEP_JOURNAL",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S")


def config(spec: dict):
    over = {"workload": "tests.reliability.trace_clips", "name": spec["name"], "storage": spec["storage"],
            "tracking.enabled": False, "train.num_workers": spec.get("workers", 2),
            "train.batch_size_per_worker": spec.get("batch", 4), "train.max_steps": spec["steps"],
            "train.checkpoint_every": spec.get("checkpoint_every", 2), "train.log_every": 1,
            "train.warmup_steps": 1, "train.max_failures": spec.get("max_failures", 0),
            "train.keep_checkpoints": spec.get("keep", 3), "train.preemption_check_every": 1,
            "task.sleep_s": spec.get("sleep_s", 0.0), "task.trace_file": spec["trace"],
            "data.root": spec["data_root"], "data.image_size": 16, "data.decode_batch_size": 4,
            "data.shuffle_buffer": 8, "data.prefetch_batches": 1,
            "data.sources": "[{format: coco_captions, train: [coco.json], val: [], media: imgs}]",
            **spec.get("over", {})}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def _drain_when_asked(request: str) -> None:
    """Wait for the test's request file, then drain the node it names (by its temp dir)."""
    from ray.core.generated import autoscaler_pb2

    while not os.path.exists(request):
        time.sleep(0.1)
    time.sleep(0.2)  # the writer's single write is complete
    with open(request, encoding="utf-8") as f:
        temp_dir = f.read().strip()
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    for node in ray.nodes():
        if node["Alive"] and node["RayletSocketName"].startswith(temp_dir.rstrip("/") + "/"):
            ok, why = gcs.drain_node(node["NodeID"], reason, "reliability test: spot reclaim notice",
                                     int(time.time() * 1000) + 600_000)
            emit({"drained": node["NodeID"], "ok": ok, "why": why})


def main(argv: list[str] | None = None) -> int:
    with open((argv or sys.argv[1:])[0], encoding="utf-8") as f:
        spec = json.load(f)
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env |= {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    if spec.get("address"):
        ray.init(address=spec["address"], runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=spec.get("num_cpus", 8), include_dashboard=False, runtime_env={"env_vars": env})
    try:
        cfg = config(spec)
        if spec.get("drain_request"):
            threading.Thread(target=_drain_when_asked, args=(spec["drain_request"],), daemon=True).start()
        out = run_training(cfg)
        stats = out.bad_clips  # the run's final counts (its tracker is gone once the run is over)
        emit({"result_step": out.metrics.get("step"), "checkpoint": out.checkpoint_uri,
              "run_dir": out.run_dir, "bad": stats.get("bad", 0), "seen": stats.get("total_seen", 0),
              "by_reason": stats.get("by_reason", {})})
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
