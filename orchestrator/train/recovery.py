"""What a worker does to recover safely: resume from the newest checkpoint that verifies, and write
nothing once its run's lease was taken over.

- :func:`resume`: candidates newest first (``checkpoint.resume_points``: complete by the storage
  listing); one whose download fails its marker's sizes or hashes on any rank is skipped with a
  warning and the previous complete one is tried, in this same attempt.  A restart could not fix a
  damaged file: it would fail the same way until ``train.max_failures``.
- :func:`fenced`: before each checkpoint, its completion marker and the export, rank 0 checks the
  run's :class:`~orchestrator.train.lease.LeaseFence` and every rank raises
  :class:`~orchestrator.train.lease.LeaseLost` together when a newer generation holds the folder.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from orchestrator.data import quality
from orchestrator.tracking.mlflow_run import read_pending
from orchestrator.train import checkpoint
from orchestrator.train.lease import LeaseLost

log = logging.getLogger(__name__)


def resume(w: Any, latest) -> Any:
    """Load the newest checkpoint that verifies into worker ``w`` (a ``loop.Worker``) and return it,
    or None (start from step 0, said loudly when there was something to resume)."""
    tried = 0
    for point in checkpoint.resume_points(latest, w.plan.run_dir):
        tried += 1
        with point.as_directory() as d:
            why = checkpoint.verify(d)
            if every_rank(why is None, w.world):
                saved = checkpoint.load(w.engine, d, verified=True)
                w.progress.load(d)
                if w.rank == 0:
                    restore_bad_clip_counts(d, w.plan.run_name)
                    w.carried_metrics = read_pending(d)
                w.state.restore(saved)
                w.resumed, w.saved_step = True, w.state.step
                if w.rank == 0:
                    log.info("resumed from step %d (epoch %d)", w.state.step, w.state.epoch)
                return point
        log.warning("skipping checkpoint %s: %s; using the previous complete one", point.path,
                    why or "another rank's copy failed its verification")
    if latest is not None:
        log.error("no checkpoint of %s verifies (%d tried): starting from step 0", w.plan.run_dir, tried)
    return None


def every_rank(ok: bool, world: int) -> bool:
    """True when ``ok`` holds on every rank (a collective: all ranks take the same decision)."""
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def fenced(w: Any) -> None:
    """Raise :class:`LeaseLost` on every rank when the run's lease is no longer its own (rank 0
    looks: one listing of the lease folder); no-op for a run without a fence."""
    fence = getattr(w.plan, "lease_fence", None)
    if fence is None:
        return
    lost = None
    if w.rank == 0:
        try:
            fence.check()
        except LeaseLost as e:
            lost = e
    if not every_rank(lost is None, w.world):
        raise lost or LeaseLost(f"run folder {fence.run_dir}: this run's lease was taken over (rank 0 saw it); "
                                "it stops here without writing another checkpoint or export")


def restore_bad_clip_counts(directory: str, run_name: str | None) -> None:
    """The bad-clip counts a checkpoint carried, into the run's tracker (rank 0, on resume)."""
    try:
        quality.restore_counts(directory, run_name)
    except Exception as e:  # a slow tracker never costs the resume; said loudly
        log.error("bad-clip counts of the checkpoint not restored (%s: %s)", type(e).__name__, e)
