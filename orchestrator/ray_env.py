"""Connecting to Ray: the cluster of ``ray job submit`` / ``RAY_ADDRESS``, else a local Ray with
more logical CPUs than cores (Train workers take fractions, Ray Data decode tasks need the rest)."""
from __future__ import annotations

import os

from orchestrator.console import ray_init_options

LOCAL_NUM_CPUS = int(os.environ.get("MPLUG2_LOCAL_NUM_CPUS", "8"))


def quiet_progress_bars() -> None:
    """Ray Data's progress bars flood logs that are not a terminal (job logs, CI, the demo's file)."""
    import sys

    import ray.data

    if not sys.stderr.isatty() or os.environ.get("MPLUG2_NO_PROGRESS"):
        ray.data.DataContext.get_current().enable_progress_bars = False


def ensure_ray() -> None:
    import ray

    quiet_progress_bars()
    if ray.is_initialized():
        return
    options = ray_init_options()
    if os.environ.get("RAY_ADDRESS"):  # a job's runtime env is the submitter's
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=options["logging_level"])
        return
    ray.init(num_cpus=max(LOCAL_NUM_CPUS, os.cpu_count() or 1), include_dashboard=False, **options)
