"""Connecting to Ray: the cluster of ``ray job submit`` / ``RAY_ADDRESS``, else a local Ray with
more logical CPUs than cores (Train workers take fractions, Ray Data decode tasks need the rest)."""
from __future__ import annotations

import os

LOCAL_NUM_CPUS = int(os.environ.get("MPLUG2_LOCAL_NUM_CPUS", "8"))


def ensure_ray() -> None:
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    ray.init(num_cpus=max(LOCAL_NUM_CPUS, os.cpu_count() or 1), include_dashboard=False)
