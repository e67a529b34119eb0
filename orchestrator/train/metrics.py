"""Metric delivery from a training worker.

- :class:`StepTimer` splits a logging window's wall time into waiting for data and computing;
- :func:`device_memory`: the worker's peak GPU memory, on a worker that uses CUDA;
- :class:`LossWindow` sums the workload's losses since the last log (on the device, no sync per
  step) and averages them across ranks when a step logs;
- :class:`MetricDelivery` sends what a step reports: to Ray Train (``ray.train.report``, the
  driver's console and a Tune trial's scheduler) and, on rank 0 of a tracked run, to MLflow through
  a :class:`~orchestrator.tracking.mlflow_run.MetricLogger`.  The points MLflow has not confirmed
  yet travel with each checkpoint (``metrics_pending.json``): a resumed rank 0 sends them first.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import torch

from orchestrator.tracking.mlflow_run import MetricLogger, read_pending, write_pending

log = logging.getLogger(__name__)


class StepTimer:
    """Splits wall time into waiting for data and computing, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wait = 0.0
        self.compute = 0.0
        self.samples = 0
        self.steps = 0
        self.start = time.perf_counter()

    def timed_batches(self, batches) -> Iterator[dict]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            t1 = time.perf_counter()
            yield batch
            self.compute += time.perf_counter() - t1

    def summary(self, world: int) -> dict[str, float]:
        total = max(self.wait + self.compute, 1e-9)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"samples_per_s": self.samples * world / elapsed, "data_wait_frac": self.wait / total}


def device_memory() -> dict[str, float]:
    """``peak_mem_gib``: the most GPU memory this process's tensors have held since it started
    (torch's ``max_memory_allocated``, GiB), once it has used CUDA; nothing on a CPU worker."""
    if not torch.cuda.is_initialized():
        return {}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


class LossWindow:
    """Running sums of the losses since the last log; each loss averaged over the micro-batches
    that had it.  Sums stay on the device (no sync per step) until :meth:`means`."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_losses(self, losses: dict[str, torch.Tensor], mixed_streams, stream: str) -> None:
        """A micro-batch's losses, and (with mixed-in streams) which stream it came from."""
        for k, v in losses.items():
            self.add(k, v.detach())
        for name in mixed_streams:
            self.add(f"{name.removeprefix('train_')}_batch_frac", float(stream == name))

    def means(self, world: int) -> dict[str, float]:
        """The window's means, averaged across ranks (a collective); the window starts afresh."""
        means = _mean_across_ranks({k: float(v) / max(self.counts[k], 1) for k, v in self.sums.items()}, world)
        self.sums, self.counts = {}, {}
        return means


def _mean_across_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


class MetricDelivery:
    """Where a worker's metrics go.  :meth:`report`: Ray Train, every rank (a log step without a
    checkpoint; a checkpoint's report carries its metrics itself).  :meth:`log`: MLflow, from rank 0
    of a tracked run once :meth:`connect` opened the logger; elsewhere a no-op.

    A checkpoint part (see :class:`~orchestrator.train.checkpoint.Checkpointer`): a checkpoint
    carries rank 0's points not yet confirmed by MLflow, and a resumed rank 0 sends them before
    anything new."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._logger: MetricLogger | None = None
        self._carried: list[dict[str, Any]] = []  # the resumed checkpoint's undelivered points

    def connect(self, tracking_uri: str | None, run_id: str | None, system_metrics: bool = False) -> None:
        """Rank 0 of a tracked run opens its MLflow logger; the carried points go first."""
        if self.rank != 0 or not run_id:
            return
        self._logger = MetricLogger(tracking_uri, run_id, system_metrics=system_metrics)
        self._logger.requeue(self._carried)
        self._carried = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._logger is not None:
            self._logger.log(metrics, step)

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(dict(metrics))

    def close(self) -> None:
        """Drain the logger (until its deadline); what could not be delivered is said loudly."""
        if self._logger is None:
            return
        delivery = self._logger.close()
        self._logger = None
        if delivery["undelivered"] or delivery["dropped"] or delivery["rejected"]:
            log.error("MLflow: %s metric points could not be delivered", delivery)

    # -- checkpoint part -------------------------------------------------------------------
    def gather(self) -> None:
        return None

    def save(self, directory: str, gathered: None) -> None:
        if self._logger is not None:  # what MLflow has not confirmed yet: a resumed rank 0 sends it
            write_pending(directory, self._logger.pending())

    def load(self, directory: str) -> None:
        if self.rank == 0:
            self._carried = read_pending(directory)
