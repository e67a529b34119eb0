"""Connecting to Ray: the cluster of ``ray job submit`` / ``RAY_ADDRESS``, else a local Ray with
more logical CPUs than cores (Train workers take fractions, Ray Data decode tasks need the rest),
listening on loopback only (:data:`RAY_HOST_ENV` to choose another address)."""
from __future__ import annotations

import os

from orchestrator.console import ray_init_options

LOCAL_NUM_CPUS = int(os.environ.get("MPLUG2_LOCAL_NUM_CPUS", "8"))

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default:
# 2 s) and takes one result per poll; a worker's ``ray.train.report`` waits in a one-slot queue
# until the previous result is taken.  At Ray's default every step that reports (``log_every``)
# within 2 s of the last report stalls until the next poll: 2.0 s per step on the tests' toy run
# whose step computes in milliseconds (benchmarks/report_poll.py).  The poll also is how fast a dead
# worker is noticed.  A user's own value (environment or the job's runtime env) wins.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.25"


def train_env_defaults() -> dict[str, str]:
    """Ray Train settings this project runs with; TorchTrainer passes them from the driver's
    environment to its controller and workers."""
    return {TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_S)}


def quiet_progress_bars() -> None:
    """Ray Data's progress bars flood logs that are not a terminal (job logs, CI, the demo's file)."""
    import sys

    import ray.data

    if not sys.stderr.isatty() or os.environ.get("MPLUG2_NO_PROGRESS"):
        ray.data.DataContext.get_current().enable_progress_bars = False


# The address the local Ray this process starts (no RAY_ADDRESS) binds its servers to: GCS, raylet,
# object manager, agents and every worker's RPC port.  Loopback by default, so nothing on the
# machine's network reaches them; MPLUG2_RAY_HOST=<ip> binds them to that address instead, and
# MPLUG2_RAY_HOST=auto leaves the choice to Ray (the machine's address, listening on every interface).
RAY_HOST_ENV = "MPLUG2_RAY_HOST"
LOOPBACK = "127.0.0.1"


def local_ray_host() -> str | None:
    """The address a local Ray binds to (:data:`RAY_HOST_ENV`), or None for Ray's own choice."""
    host = os.environ.get(RAY_HOST_ENV, LOOPBACK).strip()
    return None if host in ("", "auto") else host


def _start_local_ray(ray, host: str | None, **kwargs) -> None:
    """``ray.init`` of a new local Ray bound to ``host``.  Ray 2.60 turns a loopback
    ``_node_ip_address`` into the machine's outward address (``services.resolve_ip_for_localhost``)
    unless it runs without multi-node support (``ray_constants.ENABLE_RAY_CLUSTER``, what it does on
    macOS and Windows): that is switched off for the start only, so the node's address stays
    loopback, and every server binds to it (checked with psutil in tests/foundation/test_local_ray.py)."""
    if host is None:
        ray.init(**kwargs)
        return
    import ray._private.ray_constants as ray_constants

    loopback = host in (LOOPBACK, "localhost", "::1")
    saved = ray_constants.ENABLE_RAY_CLUSTER
    if loopback:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address=host, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ensure_ray() -> None:
    import ray

    os.environ.update(train_env_defaults())  # before any TorchTrainer of this process (also a Tune trial's)
    quiet_progress_bars()
    if ray.is_initialized():
        return
    options = ray_init_options()
    if os.environ.get("RAY_ADDRESS"):  # a job's runtime env is the submitter's
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=options["logging_level"])
        return
    _start_local_ray(ray, local_ray_host(), num_cpus=max(LOCAL_NUM_CPUS, os.cpu_count() or 1),
                     include_dashboard=False, **options)
