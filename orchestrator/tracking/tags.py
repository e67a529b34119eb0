"""The tags an MLflow run of this project carries: what ran (workload, git commit), where (the Ray
job, the cluster's size, the workers) and what it came from (its init-from run, the evaluated
checkpoint).  The end of a run adds where its outputs went (the driver's ``close_run``)."""
from __future__ import annotations

import os
from typing import Any

from orchestrator.tracking.mlflow_run import git_commit


def training_tags(workload: str, num_workers: int, use_gpu: bool, run_dir: str, init_uri: str | None = None,
                  init_run: str | None = None, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """A training run's tags when it opens (``extra``: a sweep trial's, for one)."""
    tags = {
        "mplug2.workload": workload,
        "mplug2.ray_job_id": os.environ.get("RAY_JOB_ID") or _ray_job_id(),
        "mplug2.git_commit": git_commit(),
        "mplug2.num_workers": num_workers,
        "mplug2.use_gpu": use_gpu,
        "mplug2.cluster_cpus": _cluster_resource("CPU"),
        "mplug2.cluster_gpus": _cluster_resource("GPU"),
        "mplug2.run_dir": run_dir,
        **(extra or {}),
    }
    if init_run:
        tags["mplug2.init_from_run"] = init_run
    if init_uri:
        tags["mplug2.init_from"] = init_uri
    return tags


def finished_tags(workload: str, run_dir: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """The tags of a rerun of a name that had already finished (no workers ran)."""
    return {"mplug2.workload": workload, "mplug2.run_dir": run_dir, **(extra or {})}


def evaluation_tags(workload: str, checkpoint_uri: str, split: str, num_workers: int, use_gpu: bool,
                    partial: str | None = None, source_run: str | None = None) -> dict[str, Any]:
    """An evaluation's tags: the evaluated checkpoint and the run it came from, the split, why the
    metrics may not cover all of it (``partial``)."""
    tags = {"mplug2.workload": workload, "mplug2.evaluated_checkpoint": checkpoint_uri, "mplug2.split": split,
            "mplug2.kind": "evaluation", "mplug2.git_commit": git_commit(),
            "mplug2.eval.num_workers": num_workers, "mplug2.eval.use_gpu": use_gpu}
    if partial:
        tags["mplug2.eval.partial"] = partial
    if source_run:
        tags["mplug2.source_run"] = source_run
    return tags


def _ray_job_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_job_id()
    except Exception:
        return None


def _cluster_resource(name: str) -> float:
    import ray

    return float(ray.cluster_resources().get(name, 0))
